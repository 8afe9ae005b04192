"""A model and its processor answering questions about media: what the benchmark harness, chat and the demo use.

`prepare(media)` decodes a question's pixels and runs the model's visual side once (`Visual`); every read,
option and reply of that question continues from it. `score` returns each answer's mean token cross-entropy
as the assistant turn (over the answer and its end-of-turn token, what stage-2 training labels), all answers
batched on ONE shared prefix [frames, prompt] whose KV cache is repeated per answer; `prepare_batch` and
`score_batch` do the same for several questions at once (one pass over all their prefixes, one over all their
answers: what a benchmark does on a CPU, where a small LLM call costs about as much for eight rows as for one);
`generate` replies.
Reads (`model.reads`: the foveated model's modes, or one default read) are named, so results carry them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from cli import UserError
from inputs.frames import FrameSpec, Media
from inputs.processors import processor_for
from vlm.base import VLM
from vlm.casts import ConstantCasts
from vlm.outputs import Visual


@dataclass
class Prepared:
    """One question's media, decoded and encoded once."""

    pictures: list[Any]  # the decoded frames (the SmolVLM prompt is built from them)
    visual: Visual


@dataclass
class PreparedBatch:
    """Several questions' media, encoded as one batch: question b is the Visual's clip b."""

    pictures: list[list[Any]]
    visual: Visual


class Answerer:
    def __init__(
        self,
        model: VLM,
        max_frames: int | None = None,
        image_frames: int | None = None,
        size: int | None = None,
        bf16: bool = False,
    ):
        """Frame settings default to those the model was trained with (`model.frames`). `bf16` reads under bf16
        autocast (fp32 weights), the numerics a model trained with `train.bf16` saw: about half the LLM time on
        a GPU or an avx512_bf16 CPU, at the cost of scores that differ from fp32 in the last bits."""
        changes = {"max_frames": max_frames, "image_frames": image_frames, "size": size}
        frames = dataclasses.replace(model.frames, **{k: v for k, v in changes.items() if v is not None})
        self.model, self.processor = model.eval(), processor_for(model, frames=frames)
        self.reads: dict[str, dict[str, Any]] = model.reads
        self.device = next(model.parameters()).device
        self.bf16 = bf16
        self.autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=bf16)
        self.casts = ConstantCasts([model], bf16, constant="all")  # its weights cast to bf16 once: casts.py

    def share_frozen(self, other: Answerer, batches: int = 1) -> bool:
        """Let `other`, reading the same batches right after this one, reuse this model's work on them that depends
        only on frozen weights (`VLM.share_frozen`). Under bf16 both then read through one set of weight copies:
        a shared pass is reused only through the very tensors it ran with, so each its own copies would share
        nothing."""
        shared = self.model.share_frozen(other.model, batches)
        if shared and self.bf16 == other.bf16:
            self.casts = other.casts = ConstantCasts([self.model, other.model], self.bf16, constant="all")
        return shared

    @property
    def frames(self) -> FrameSpec:
        """The frame settings questions are read with."""
        return self.processor.frames

    def prepare(self, media: Media) -> Prepared:
        return self.prepare_pictures(media.pictures(self.processor.frames))

    def prepare_pictures(self, pictures: list[Any]) -> Prepared:
        """Already decoded frames (e.g. a training sample's, processors' `pictures`) -> the prepared question."""
        return Prepared(pictures, self.prepare_batch([pictures]).visual)

    @torch.inference_mode()
    def prepare_batch(self, pictures: list[list[Any]]) -> PreparedBatch:
        """Several questions' decoded frames -> one encoding of them all (batched, padded to the longest clip)."""
        inputs = {k: v.to(self.device) for k, v in self.processor.visual_batch(pictures).items()}
        with self.casts, self.autocast:
            return PreparedBatch(pictures, self.model.prepare(**inputs))

    def score(self, state: Prepared, question: str, answers: list[str], read: str) -> list[float]:
        return self.score_batch(PreparedBatch([state.pictures], state.visual), [question], [answers], read)[0]

    def score_batch(
        self,
        batch: PreparedBatch,
        questions: list[str],
        answers: list[list[str]],
        read: str,
        clips: list[int] | None = None,
    ) -> list[list[float]]:
        """Each question's answers scored in one batched pass of every question and answer: per question, what
        `score` gives it alone (up to float rounding). `clips`: the batch's clip each question is about (default:
        question i, clip i), so that questions about one clip share its encoding and each gets its own read."""
        visual, pictures = batch.visual, batch.pictures
        if clips is not None:
            visual = self.model.visual_rows(visual, torch.tensor(clips, device=self.device))
            pictures = [pictures[c] for c in clips]
        prompts = [self.processor.prompt(q, p) for q, p in zip(questions, pictures, strict=True)]
        pairs = [self.processor.answers(q, a) for q, a in zip(questions, answers, strict=True)]
        continuations, labels = [c for c, _ in pairs], [y for _, y in pairs]
        with self.casts, self.autocast:
            nll = self.model.options_nll(visual, prompts, continuations, labels, **self.reads[read])
        nll = nll.float().tolist()
        out, start = [], 0
        for a in answers:
            out.append(nll[start : start + len(a)])
            start += len(a)
        return out

    def generate(self, state: Prepared, question: str, read: str, max_new_tokens: int = 64, **decoding: Any) -> str:
        """A greedy reply in the named read; `decoding`: generate's options (the chat's rules against repeating;
        none in the benchmarks)."""
        if read not in self.reads:
            raise UserError(f"this model reads in {list(self.reads)}, not {read!r}")
        ids = torch.tensor([self.processor.prompt(question, state.pictures)], device=self.device)
        ends = self.processor.end_ids
        with self.casts, self.autocast:
            new = self.model.generate(
                state.visual, ids, torch.ones_like(ids), max_new_tokens, ends, **decoding, **self.reads[read]
            )
        return self.processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
