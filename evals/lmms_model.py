"""The `fvlm` model behind lmms-eval's simple-model interface (registered by evals/lmms_plugin.py); the module
docstring there says how requests are answered and which model args it takes."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

import registry
from evals.answering import Answerer, Prepared
from inputs.frames import IMAGE_EXTS, Media, MediaError, sample_indices
from inputs.tokenization import IGNORE_INDEX

LIKELIHOODS = ("mean_nll", "logprob")
_PLACEHOLDER = "<image>"  # some task prompts mark the image's place; the model places its frames itself


def _flat(visual: Any) -> list[Any]:
    """doc_to_visual's answer as a flat list: None, one item, a list, or a list holding one list."""
    if visual is None:
        return []
    if not isinstance(visual, list | tuple):
        return [visual]
    return [v for item in visual for v in (item if isinstance(item, list | tuple) else [item])]


def _key(visuals: list[Any]) -> tuple:
    """What makes two requests show the same media: the same files, or images with the same pixels."""
    out = []
    for v in visuals:
        if isinstance(v, str | Path):
            out.append(("file", str(v)))
        elif isinstance(v, Image.Image | np.ndarray):
            a = np.asarray(v)
            out.append(("pixels", a.shape, str(a.dtype), hashlib.sha1(a.tobytes()).hexdigest()))
        else:
            raise TypeError(f"fvlm reads images and video or image files, not {type(v).__name__} visuals")
    return tuple(out)


class FVLM(lmms):
    """A saved model of the project behind lmms-eval's simple-model interface."""

    def __init__(
        self,
        pretrained: str,
        read: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_frames: int | None = None,
        image_frames: int | None = None,
        frame_size: int | None = None,
        max_new_tokens: int = 16,
        likelihood: str = "mean_nll",
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            warnings.warn(f"fvlm ignores the model args {sorted(unused)}", stacklevel=2)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = registry.load(pretrained).to(self._device)
        self.answerer: Answerer = Answerer(model, max_frames, image_frames, frame_size)
        reads = list(self.answerer.reads)
        self.read = read or reads[-1]
        if self.read not in reads:
            raise ValueError(f"read {self.read!r} is not among this model's {reads}")
        self.batch_size = batch_size
        self.max_new_tokens = int(max_new_tokens)
        self.likelihood = likelihood
        self._sampling_warned = False

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- media -------------------------------------------------------------------------------

    def _visuals(self, args: tuple) -> list[Any]:
        """A request's visuals; none for the harness's context-free requests (context, continuation)."""
        if len(args) < 6:
            return []
        doc_to_visual, doc_id, task, split = args[2:6]
        return _flat(doc_to_visual(self.task_dict[task][split][doc_id]))

    def _by_media(self, requests: list[Instance]) -> Iterator[tuple[list[Any], list[int]]]:
        """(visuals, request indices) per distinct media, in order of first appearance. Only the keys are kept
        while grouping, so the visuals are fetched again once per group rather than held for every request."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_key(self._visuals(request.args)), []).append(i)
        for members in groups.values():
            yield self._visuals(requests[members[0]].args), members

    def _prepare(self, visuals: list[Any]) -> Prepared | None:
        """Visuals decoded as frames.Media decodes a question's media (a file by its extension; an image
        repeated `image_frames` times; several images as a clip's frames, `max_frames` spread over them) and
        encoded; None (with a warning) when the media cannot be decoded, which benchmark.py scores as wrong."""

        spec = self.answerer.frames
        try:
            if not visuals:
                return self.answerer.prepare(Media("none"))
            if all(isinstance(v, str | Path) for v in visuals):
                if len(visuals) == 1:
                    return self.answerer.prepare(Media.at(visuals[0]))
                if all(Path(v).suffix.lower().lstrip(".") in IMAGE_EXTS for v in visuals):
                    return self.answerer.prepare(Media("frames", [Path(v) for v in visuals]))
                raise ValueError(f"fvlm reads one video or a list of images per request, got {visuals}")
            if any(isinstance(v, str | Path) for v in visuals):
                raise ValueError("fvlm reads files or decoded images per request, not both")
            images = [v if isinstance(v, Image.Image) else Image.fromarray(v) for v in visuals]
            if len(images) == 1:
                pictures = [images[0].convert("RGB")] * spec.image_frames
            else:
                pictures = [images[i].convert("RGB") for i in sample_indices(len(images), 1.0, spec.max_frames)]
            return self.answerer.prepare_pictures(pictures)
        except MediaError as e:
            warnings.warn(f"fvlm: undecodable media ({e}); the request is answered empty", stacklevel=2)
            return None

    def _each_media(self, requests: list[Instance], answer: Callable[[Prepared | None, list[int]], None]) -> None:
        with tqdm(total=len(requests), disable=self.rank != 0, desc="fvlm") as bar:
            for visuals, members in self._by_media(requests):
                answer(self._prepare(visuals), members)
                bar.update(len(members))

    def _prompt(self, state: Prepared, context: str) -> torch.Tensor:
        return torch.tensor([self.answerer.processor.prompt(context, state.pictures)], device=self._device)

    # ---- the harness's requests --------------------------------------------------------------

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """args (context, generation_kwargs, doc_to_visual, doc_id, task, split) -> the reply: greedy (beam search
        with `num_beams` > 1) for at most `max_new_tokens`, decoded without special tokens, cut before the first
        `until` string, stripped. Sampling is not done: a task that asks for it gets the greedy reply."""
        replies = [""] * len(requests)

        def answer(state: Prepared | None, members: list[int]) -> None:
            for i in members:
                context, kwargs = requests[i].args[:2]
                if state is not None:
                    replies[i] = self._reply(state, context.replace(_PLACEHOLDER, ""), dict(kwargs or {}))

        self._each_media(requests, answer)
        return replies

    def _reply(self, state: Prepared, context: str, kwargs: dict[str, Any]) -> str:
        if kwargs.get("do_sample") and float(kwargs.get("temperature") or 0) > 0 and not self._sampling_warned:
            warnings.warn("fvlm decodes greedily: the task's sampling settings are ignored", stacklevel=2)
            self._sampling_warned = True
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        ids = self._prompt(state, context)
        new = self.answerer.model.generate(
            state.visual,
            ids,
            torch.ones_like(ids),
            int(kwargs.get("max_new_tokens") or self.max_new_tokens),
            self.answerer.processor.end_ids,
            num_beams=int(kwargs.get("num_beams") or 1),
            **self.answerer.reads[self.read],
        )
        text = self.answerer.processor.tokenizer.decode(new[0], skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip()

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """args (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split), or (context,
        continuation) -> (value, is_greedy): the continuation scored as the assistant's reply to the context
        (its leading target delimiter dropped, as a reply starts right after the generation prompt), over its
        tokens and the end-of-turn token, as benchmark.py's likelihood protocol scores an option; is_greedy:
        whether greedy decoding writes exactly those tokens. The continuations of one (media, context) run as
        one batch on its shared prefix.

        The value, `likelihood=`: `mean_nll` (default) the mean negative log-likelihood per token, the loss
        lmms-eval's own models return and its multiple_choice tasks take the argmin of, so the option chosen is
        benchmark.py's; `logprob` the summed log-probability of the base class's docstring (lower is worse, so
        multiple_choice then picks the least likely option). Each pair is wrapped in a GenerationResult: 0.7.3's
        evaluator turns any other non-string reply into its str()."""
        out: list[GenerationResult | None] = [None] * len(requests)

        def answer(state: Prepared | None, members: list[int]) -> None:
            by_context: dict[str, list[int]] = {}
            for i in members:
                by_context.setdefault(requests[i].args[0], []).append(i)
            for context, idx in by_context.items():
                if state is None:
                    pairs = [(float("inf") if self.likelihood == "mean_nll" else float("-inf"), False)] * len(idx)
                else:
                    answers = [self._continuation(requests[i].args).lstrip() for i in idx]
                    pairs = self._score(state, context.replace(_PLACEHOLDER, ""), answers, IGNORE_INDEX)
                for i, pair in zip(idx, pairs, strict=True):
                    out[i] = GenerationResult(text=pair)  # type: ignore[arg-type]

        self._each_media(requests, answer)
        return out  # type: ignore[return-value]

    def _continuation(self, args: tuple) -> str:
        target = args[1]
        if isinstance(target, str):
            return target
        doc_id, task, split = args[3:6]
        return str(target(self.task_dict[task][split][doc_id]))

    def _score(self, state: Prepared, context: str, answers: list[str], ignore: int) -> list[tuple[float, bool]]:
        processor, model, read = self.answerer.processor, self.answerer.model, self.answerer.reads[self.read]
        prompt = processor.prompt(context, state.pictures)
        continuations, labels = processor.answers(context, answers)
        nll, count = model.option_nll(state.visual, prompt, continuations, labels, mean=False, **read)
        pairs = zip(continuations, labels, strict=True)
        scored = [[t for t, y in zip(c, lab, strict=True) if y != ignore] for c, lab in pairs]
        ids = torch.tensor([prompt], device=self._device)
        greedy = model.generate(state.visual, ids, torch.ones_like(ids), max(map(len, scored)), processor.end_ids,
                                **read)[0].tolist()  # fmt: skip
        values = (nll / count.clamp(min=1)) if self.likelihood == "mean_nll" else -nll
        return [(float(v), greedy[: len(s)] == s) for v, s in zip(values.tolist(), scored, strict=True)]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("fvlm answers single-turn requests (generate_until, loglikelihood)")
