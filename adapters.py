"""What the benchmark harness asks of a model, for each kind of saved model directory.

An adapter has three calls:
  prepare(media)                          -> state: the question's pixels decoded and encoded ONCE
  score(state, prompt, answers, mode)     -> each answer's mean token cross-entropy (lower = preferred)
  generate(state, prompt, mode, max_new)  -> a greedy reply
and `modes`, the forward modes it can answer in. The harness reuses one state for every mode and
protocol of a question, so a model that can cache its visual encoding does it in `prepare`.

Answers are scored as the assistant turn of the model's chat template, over the answer's tokens and its
end-of-turn token (what stage-2 training labels), all answers batched on top of ONE shared prefix
[frames, prompt]: the prefix runs once per mode, its KV cache is repeated per answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from benchmarks import Media
from encoder import PatchCache
from model import IGNORE_INDEX, MODES, FoveatedVLM, token_nll
from tokenization import chat_ids, prompt_ids


class Adapter(Protocol):
    modes: tuple[str, ...]

    def prepare(self, media: Media) -> Any: ...

    def score(self, state: Any, prompt: str, answers: list[str], mode: str) -> list[float]: ...

    def generate(self, state: Any, prompt: str, mode: str, max_new_tokens: int) -> str: ...


def _pad(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ids (n, L) with pad 0 and their mask (n, L)."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


def _mean_nll(first_logits: Tensor, logits: Tensor, ids: Tensor, labels: Tensor) -> Tensor:
    """Mean token NLL per row: `first_logits` (n, V) predict position 0 of `labels` (n, L) from the prefix,
    `logits` (n, L, V) at the continuation `ids` predict positions 1…; labels -100 are not scored."""
    logits = torch.cat([first_logits[:, None], logits], dim=1)  # (n, 1+L, V)
    nll, count = token_nll(logits, F.pad(labels, (1, 0), value=IGNORE_INDEX))
    return nll / count.clamp(min=1)


@torch.inference_mode()
def option_nll(
    model: FoveatedVLM,
    cache: PatchCache,
    frame_mask: Tensor,
    prompt: list[int],
    continuations: list[list[int]],
    labels: list[list[int]],
    mode: str,
) -> Tensor:
    """Mean NLL (n,) of each continuation's labelled tokens after the shared prefix [frames, prompt].

    The prefix (one sample, frame_mask (1, T)) runs once; the n continuations run as one batch on its
    KV cache, right-padded, with positions counted over real tokens as the model does.
    """
    device, n = frame_mask.device, len(continuations)
    ids = torch.tensor([prompt], device=device)
    pre = model.prefix(cache, frame_mask, ids, torch.ones_like(ids), mode, kv_cache=True)
    pre.past.batch_repeat_interleave(n)
    cont, cont_mask = _pad(continuations, device)  # (n, L)
    target, _ = _pad(labels, device)
    target = target.masked_fill(cont_mask == 0, IGNORE_INDEX)
    mask = torch.cat([pre.mask.expand(n, -1), cont_mask], dim=1)  # (n, S + L)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -cont.shape[1] :]
    hidden = model.llm.get_decoder()(
        inputs_embeds=model.llm.get_input_embeddings()(cont),
        attention_mask=mask,
        position_ids=positions,
        past_key_values=pre.past,
        use_cache=True,
    ).last_hidden_state  # (n, L, D)
    head = model.llm.get_output_embeddings()
    return _mean_nll(head(pre.hidden[:, -1]).expand(n, -1), head(hidden), cont, target)


State = tuple[Tensor, Tensor, PatchCache]  # frames (1,T,3,H,W), frame_mask (1,T), their patch cache


class FoveatedAdapter:
    """A FoveatedVLM: the frames are DINO-encoded once per question; every mode reads that patch cache."""

    modes = MODES

    def __init__(
        self,
        model: FoveatedVLM,
        max_frames: int | None = None,
        image_frames: int | None = None,
        size: int | None = None,
    ):
        """Frame settings default to those the model was trained with (`model.frames`)."""
        if model.tokenizer is None:
            raise ValueError("the model carries no tokenizer: save it with one (FoveatedVLM.from_backbones does)")
        self.model, self.tokenizer = model.eval(), model.tokenizer
        fed = model.frames
        self.max_frames = fed.max_frames if max_frames is None else max_frames
        self.image_frames = fed.image_frames if image_frames is None else image_frames
        self.size = fed.size if size is None else size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def prepare(self, media: Media) -> State:
        frames = media.frames(self.max_frames, self.image_frames, self.size)[None].to(self.device)  # (1,T,3,H,W)
        frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=self.device)  # (1,T)
        return frames, frame_mask, self.model.encode(frames, frame_mask)

    def score(self, state: State, prompt: str, answers: list[str], mode: str) -> list[float]:
        _, frame_mask, cache = state
        head = prompt_ids(self.tokenizer, prompt)  # chat_ids starts with exactly these tokens
        pairs = [chat_ids(self.tokenizer, prompt, a, stage=2) for a in answers]  # prompt + answer + end of turn
        rest = [(ids[len(head) :], labels[len(head) :]) for ids, labels in pairs]
        nll = option_nll(self.model, cache, frame_mask, head, [r[0] for r in rest], [r[1] for r in rest], mode)
        return nll.tolist()

    def generate(self, state: State, prompt: str, mode: str, max_new_tokens: int) -> str:
        frames, frame_mask, cache = state
        ids = torch.tensor([prompt_ids(self.tokenizer, prompt)], device=self.device)
        new = self.model.generate(
            frames, frame_mask, ids, torch.ones_like(ids), mode, max_new_tokens, self.tokenizer.eos_token_id, cache
        )
        return self.tokenizer.decode(new[0], skip_special_tokens=True).strip()


class SmolVLMAdapter:
    """A SmolVLM (Idefics3) directory from smolvlm.save_pretrained: images only, one forward mode.

    Its vision tower runs inside the model's forward, so `prepare` only decodes; each score or
    generate call encodes the image once (the answers share the prefix's KV cache).
    """

    modes = ("default",)

    def __init__(self, model: Any, processor: Any):
        self.model, self.processor = model.eval(), processor
        self.device = model.device

    def prepare(self, media: Media) -> list[Image.Image]:
        if media.kind not in ("image", "none"):
            raise ValueError(f"the SmolVLM adapter reads images, not {media.kind}")
        return [media.image()] if media.kind == "image" else []

    def _turn(self, images: list[Image.Image], prompt: str, answer: str | None = None) -> tuple[str, str]:
        """(prompt text up to the generation prompt, the answer's text through its end-of-turn token)."""
        user = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
        head = self.processor.apply_chat_template(user, add_generation_prompt=True)
        if answer is None:
            return head, ""
        reply = [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full = self.processor.apply_chat_template(user + reply)
        if not full.startswith(head):
            raise ValueError("the chat template does not continue the generation prompt with the answer")
        return head, full[len(head) :].rstrip("\n")

    def _inputs(self, images: list[Image.Image], text: str) -> dict[str, Tensor]:
        inputs = self.processor(text=[text], images=[images] if images else None, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def score(self, state: list[Image.Image], prompt: str, answers: list[str], mode: str) -> list[float]:
        head = self._turn(state, prompt)[0]
        inputs = self._inputs(state, head)
        out = self.model(**inputs, use_cache=True)
        n = len(answers)
        out.past_key_values.batch_repeat_interleave(n)
        tokenizer = self.processor.tokenizer
        rows = [tokenizer(self._turn(state, prompt, a)[1], add_special_tokens=False)["input_ids"] for a in answers]
        cont, cont_mask = _pad(rows, self.device)
        mask = torch.cat([inputs["attention_mask"].expand(n, -1), cont_mask], dim=1)
        logits = self.model(input_ids=cont, attention_mask=mask, past_key_values=out.past_key_values).logits
        target = cont.masked_fill(cont_mask == 0, IGNORE_INDEX)
        return _mean_nll(out.logits[:, -1].expand(n, -1), logits, cont, target).tolist()

    @torch.inference_mode()
    def generate(self, state: list[Image.Image], prompt: str, mode: str, max_new_tokens: int) -> str:
        import smolvlm

        return smolvlm.generate(self.model, self.processor, state, prompt, max_new_tokens)


def load_adapter(
    path: str | Path,
    device: str = "cpu",
    max_frames: int | None = None,
    image_frames: int | None = None,
    size: int | None = None,
) -> Adapter:
    """The adapter for a saved model directory, recognised by its files: a SmolVLM directory holds
    smolvlm.CONNECTOR_CONFIG, a FoveatedVLM one checkpoint.py's config.json + model.safetensors."""
    import smolvlm

    path = Path(path)
    if (path / smolvlm.CONNECTOR_CONFIG).is_file():
        model, processor = smolvlm.load_pretrained(path)
        return SmolVLMAdapter(model.to(device), processor)
    return FoveatedAdapter(FoveatedVLM.from_pretrained(path).to(device), max_frames, image_frames, size)
