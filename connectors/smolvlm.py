"""SmolVLM (Idefics3) behind the base VLM interface, its connector optionally a TokenLearner-QFormer.

SmolVLM keeps its own prompt layout, the one it was pretrained on: each image is a run of `<image>` tokens
inside the user turn (plus tile tokens when images are split), and Idefics3 scatters the connector's output
into those positions. So this kind overrides the layout (`prefix`) and leaves the rest to the base: the loss,
generation on the KV cache, option scoring and parameter groups (`llm.` is the whole Idefics3 model here:
`llm.model.vision_model.` the vision group, `llm.model.connector.` the connector, the text model and its head
the LLM group). Its processor (processors.SmolVLMProcessor) builds the prompts, so training and evaluation
see the same tokens.

Idefics3Model calls `self.connector(image_hidden_states)` with one tensor (N, P, vision_hidden) per real
image or tile, so the connector's S tokens per image must match the processor's `image_seq_len`: every
builder here sets both. It has to be the processor attribute: transformers 5.23 ignores
`processor(..., image_seq_len=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
)

from config import SmolVLMConfig
from connectors import TokenLearnerQFormer
from inputs.frames import FrameSpec
from vlm.base import VLM, positions
from vlm.kvcache import StaticKV, StepCache
from vlm.loss import labelled_nll
from vlm.outputs import Output, Prefix, Visual


def qformer(idefics: Idefics3Config, options: Any) -> TokenLearnerQFormer:
    """A TokenLearner-QFormer whose widths fit `idefics`; other sizes from `options` (config.QFormerOptions)."""
    return TokenLearnerQFormer.from_options(options, idefics.vision_config.hidden_size, idefics.text_config.hidden_size)


class SmolVLM(VLM):
    kind = "smolvlm"
    vision_prefixes = ("llm.model.vision_model.",)
    llm_prefixes = ("llm.model.text_model.", "llm.lm_head.")

    def __init__(
        self,
        config: SmolVLMConfig,
        idefics: Idefics3ForConditionalGeneration,
        processor: Idefics3Processor,
        frames: FrameSpec | None = None,
    ):
        frames = dataclasses.replace(frames or FrameSpec(), image_frames=1)  # an image is one image here
        super().__init__(config, idefics, processor.tokenizer, frames)
        self.processor = processor  # builds the prompts; saved with the model
        if config.connector == "tokenlearner_qformer":
            idefics.model.connector = qformer(idefics.config, config.qformer)
            processor.image_seq_len = config.qformer.num_queries
        if config.image_splitting is not None:
            processor.image_processor.do_image_splitting = config.image_splitting

    @property
    def tokens_per_frame(self) -> int:
        return self.processor.image_seq_len

    def decoder(self) -> nn.Module:
        return self.llm.model.text_model

    def embed(self, ids: Tensor) -> Tensor:
        return self.llm.model.text_model.get_input_embeddings()(ids)

    def lm_head(self, hidden: Tensor) -> Tensor:
        return self.llm.lm_head(hidden)

    def prepare(self, pixel_values: Tensor | None = None, pixel_attention_mask: Tensor | None = None) -> Visual:
        """pixel_values (B, N, 3, H, W) as the processor pads them (all-zero views are padding)."""
        if pixel_values is None:
            return Visual(torch.zeros(1, 0, dtype=torch.bool), None)
        real = pixel_values.flatten(2).ne(0).any(-1)  # (B, N)
        return Visual(real, (pixel_values, pixel_attention_mask))

    def visual_rows(self, visual: Visual, rows: Tensor) -> Visual:
        features = None if visual.features is None else tuple(x[rows] for x in visual.features)
        mask = visual.frame_mask.new_zeros(len(rows), 0) if visual.features is None else visual.frame_mask[rows]
        return Visual(mask, features)

    def prefix(
        self,
        visual: Visual,
        input_ids: Tensor,
        attention_mask: Tensor,
        kv_cache: bool = False,
        rows: Tensor | None = None,
        room: int | None = None,
        split: Tensor | None = None,
        **read: Any,
    ) -> Prefix:
        """Idefics3 over its own layout: the image features take the places of the `<image>` tokens (`room`: a
        static cache, as the base's; `split` is not read: the `<image>` tokens stand where its processor put them)."""
        self.check_read(read)
        pixels, pixel_mask = visual.features if visual.features is not None else (None, None)
        if pixels is not None and rows is not None:
            pixels, pixel_mask = pixels[rows], pixel_mask[rows]
        if pixels is not None and not visual.frame_mask.any():
            pixels = pixel_mask = None
        past = self.new_cache(kv_cache, room, input_ids.shape[1])
        static = isinstance(past, StaticKV)
        step = past if static else StepCache(past) if past is not None else None
        out = self.llm.model(
            input_ids=input_ids,
            attention_mask=past.pad(attention_mask) if static else attention_mask,
            position_ids=positions(attention_mask, input_ids.shape[1]),
            pixel_values=pixels,
            pixel_attention_mask=pixel_mask,
            past_key_values=step,
            use_cache=step is not None,
        )
        if isinstance(step, StepCache):
            step.commit(past)
        r, d = input_ids.shape[0], out.last_hidden_state.shape[-1]
        none = torch.zeros(r, dtype=torch.bool, device=input_ids.device)
        return Prefix(out.last_hidden_state, attention_mask.long(), past, None, input_ids.new_zeros(r, d), none, 0)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        pixel_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        visual: Visual | None = None,
        rows: Tensor | None = None,
        logits: bool = True,
        **read: Any,
    ) -> Output:
        """A SmolVLM batch (processors.SmolVLMProcessor's format) -> logits, and the loss over its labels."""
        if visual is None:
            visual = self.prepare(pixel_values, pixel_attention_mask)
        pre = self.prefix(visual, input_ids, attention_mask, False, rows, **read)
        out = Output(self.lm_head(pre.hidden) if logits else None)
        if labels is not None:
            out.nll, out.count = labelled_nll(self.lm_head, pre.hidden, labels)
            out.loss = out.nll.sum() / out.count.sum().clamp(min=1)
        return out

    def counts(self, batch: dict[str, Tensor]) -> tuple[int, int]:
        return batch["input_ids"].shape[0], int(batch["attention_mask"].sum())  # <image> tokens included

    def backbone_configs(self) -> dict[str, dict]:
        return {"idefics3": self.llm.config.to_dict()}

    @classmethod
    def from_configs(
        cls, config: SmolVLMConfig, backbones: dict, processor: Idefics3Processor, frames: FrameSpec
    ) -> SmolVLM:
        """A randomly initialised model of the saved shapes (`from_saved` loads the weights into it)."""
        return cls(config, Idefics3ForConditionalGeneration(Idefics3Config.from_dict(backbones["idefics3"])),
                   processor, frames)  # fmt: skip

    @classmethod
    def from_backbones(cls, config: SmolVLMConfig, frames: FrameSpec | None = None) -> SmolVLM:
        """The pretrained SmolVLM of `config.hub` (a hub id, or a local copy) and its processor; a
        TokenLearner-QFormer connector, if asked for, starts from scratch."""
        idefics = Idefics3ForConditionalGeneration.from_pretrained(config.hub, dtype=torch.float32)
        return cls(config, idefics, Idefics3Processor.from_pretrained(config.hub), frames)
