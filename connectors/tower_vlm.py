"""A vision tower, a connector and an LLM: every design whose read of a frame does not depend on the LLM.

The tower encodes each real frame once (towers.py: patches (N, P, Dv) and a pooled vector (N, Dv)); the
connector of `model.kind` (connectors/) maps them to S tokens per frame; the base VLM (vlm/base.py) puts the T*S
tokens of a clip before its text. Any of them reads video: a clip of T frames is T x S tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from config import TowerModelConfig
from connectors import CONNECTORS
from connectors.towers import VisionTower, tower_config, tower_from_config
from inputs.frames import FrameSpec
from vlm import weights
from vlm.base import VLM, Encoded, real_frames
from vlm.layout import Lead
from vlm.outputs import Visual, frames_of


class TowerVLM(VLM):
    vision_prefixes = ("tower.",)

    def __init__(
        self,
        config: TowerModelConfig,
        tower: VisionTower,
        llm: nn.Module,
        tokenizer: Any = None,
        frames: FrameSpec | None = None,
    ):
        # the tower decides the normalisation, the config the resize: not for the run to change
        letterbox = config.image_prep == "letterbox"
        frames = dataclasses.replace(frames or FrameSpec(), mean=tower.mean, std=tower.std, letterbox=letterbox)
        super().__init__(config, llm, tokenizer, frames)
        self.kind = config.kind
        self.tower = tower
        self.connector = CONNECTORS[config.kind].from_options(config, tower.dim, llm.config.hidden_size)

    @property
    def tokens_per_frame(self) -> int:
        return self.connector.tokens_per_frame(self.tower.grid(self.frames.size))

    def prepare(self, frames: Tensor, frame_mask: Tensor) -> Encoded:
        """Tower outputs of the real frames, batch-major: patches (N, P, Dv), pooled (N, Dv), and their places."""
        places = real_frames(frame_mask)
        real = frames[places]  # (N, 3, H, W)
        if torch.compiler.is_compiling() and frame_mask.shape[1]:
            # N, read from the data, is not 0 (a batch of T > 0 has a clip with a frame): the towers' reshapes
            # need that known
            torch._check(len(real) > 0)
        elif not len(real):  # the towers do not run on no image
            p, d = self.tower.grid(frames.shape[-1]) ** 2, self.tower.dim
            return Encoded(frame_mask, (frames.new_zeros(0, p, d), frames.new_zeros(0, d)), places)
        return Encoded(frame_mask, self.tower(real), places)

    def visual_rows(self, visual: Visual, rows: Tensor) -> Encoded:
        patches, pooled = visual.features
        index = frames_of(visual.frame_mask, rows)
        mask = visual.frame_mask[rows]
        return Encoded(mask, (patches[index], pooled[index]), real_frames(mask))

    def visual_tokens(self, visual: Encoded, lead: Lead | None = None) -> tuple[Tensor, Tensor | None]:
        """-> tokens (B, T*S, D) (question-blind: the `lead` is not read) and, for a connector that pools with
        spatial maps (TokenLearner), where each of its pooled tokens looked: (B, T, maps, 1+P) in attention_viz's
        layout (a zero for the CLS position). Scattered to the frames' places, not by the mask: the mask's
        selection would be a second size read from the data, which a compiled step could not match to N."""
        patches, pooled = visual.features
        b, t = visual.frame_mask.shape
        s, d = self.tokens_per_frame, self.llm.config.hidden_size
        tokens = patches.new_zeros(b, t, s, d)  # (B, T, S, D)
        maps = None
        if t and (torch.compiler.is_compiling() or len(patches)):  # compiled, N > 0 is known from `prepare`
            if getattr(self.connector, "token_learner", None) is not None:
                out, found = self.connector(patches, pooled, return_maps=True)  # (N, S, D), (N, T_tl, P)
                found = torch.cat([found.new_zeros(*found.shape[:2], 1), found], dim=-1)
                maps = found.new_zeros(b, t, *found.shape[1:]).index_put(visual.places, found)
            else:
                out = self.connector(patches, pooled)
            tokens = tokens.index_put(visual.places, out.to(tokens.dtype))
        return tokens.view(b, t * s, d), maps

    def checkpoint_activations(self) -> None:
        super().checkpoint_activations()
        self.tower.gradient_checkpointing_enable()

    def backbone_configs(self) -> dict[str, dict]:
        return {"tower": tower_config(self.tower), "llm": self.llm.config.to_dict()}

    @classmethod
    def from_configs(cls, config: TowerModelConfig, backbones: dict, tokenizer: Any, frames: FrameSpec) -> VLM:
        """A randomly initialised model of the saved shapes (`from_saved` loads the weights into it)."""
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**backbones["llm"]))
        return cls(config, tower_from_config(backbones["tower"]), llm, tokenizer, frames)

    @classmethod
    def from_backbones(cls, config: TowerModelConfig, frames: FrameSpec | None = None) -> VLM:
        """A new model around a pretrained tower and LLM (hub ids, local dirs, or "packaged"), its connector new."""
        tower = VisionTower(weights.load_tower(config.tower))
        return cls(config, tower, weights.load_llm(config.llm), weights.load_tokenizer(config.llm), frames)

    @classmethod
    def holds(cls, kind: str) -> bool:
        return kind in CONNECTORS
