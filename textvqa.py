"""TextVQA (Singh et al. 2019) in its published layout → answer-labelled SmolVLM training batches.

Layout (ROOT = data.textvqa):
  ROOT/TextVQA_0.5.1_{train,val}.json   {"data": [{question_id, question, image_id, answers[10], …}]}
  ROOT/train_images/{image_id}.jpg      (the val questions' images live there too)

Each question trains on its most frequent answer, asked with the short-answer prompt the benchmark
harness evaluates with. Batches follow data.py's contract: collated tensors plus `keys` (question ids)
and `skipped` (per-reason counts of samples lost since the previous batch: an undecodable or missing
image is dropped from its batch and counted as bad_media; a batch that loses every image stays in the
sequence as an empty marker), and a loader reopened with `skip_batches = N` continues exactly after the
epoch's first N batches, for any number of workers, since an epoch's batches are fixed lists of questions.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import smolvlm
from config import DataConfig
from frames import MediaError, read_image

log = logging.getLogger(__name__)

FILES = {"train": "TextVQA_0.5.1_train.json", "val": "TextVQA_0.5.1_val.json"}
IMAGES = "train_images"
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Question:
    """One TextVQA question as published; its image path already resolved under ROOT."""

    question_id: str
    question: str
    image: Path
    answers: tuple[str, ...]  # the 10 annotators' answers

    @property
    def answer(self) -> str:
        """The most frequent answer (the first given among equally frequent ones): the training target."""
        return Counter(self.answers).most_common(1)[0][0]

    @property
    def prompt(self) -> str:
        # str.capitalize (which also lowercases the rest) as lmms-eval and benchmarks.py ask it: train as evaluated
        return self.question.capitalize() + SHORT_ANSWER_PROMPT


def load_questions(root: str | Path, split: str = "train") -> list[Question]:
    """The questions of `split` (train | val), in file order."""
    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
    root = Path(root)
    path = root / FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"TextVQA {split}: {path} not found (expected {FILES[split]} in {root})")
    return [
        Question(str(q["question_id"]), q["question"], root / IMAGES / f"{q['image_id']}.jpg", tuple(q["answers"]))
        for q in json.loads(path.read_text())["data"]
    ]


def _subset(n: int, cfg: DataConfig) -> list[int]:
    """Indices of the training questions in use: all, or a seeded random `cfg.subset` of them."""
    if not cfg.subset or cfg.subset >= n:
        return list(range(n))
    return sorted(random.Random(f"{cfg.seed}:subset").sample(range(n), cfg.subset))


def _batches(n: int, cfg: DataConfig, rank: int, world_size: int, epoch: int, split: str) -> list[list[int]]:
    """This rank's batches of question indices for one epoch (the last may be smaller); training reshuffles
    with (seed, epoch). Every rank gets len // world_size questions, so DDP ranks run out together."""
    order = list(range(n))
    if split == "train":
        order = _subset(n, cfg)
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
    mine = order[rank::world_size][: len(order) // world_size]
    return [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]


def epoch_batches(cfg: DataConfig, world_size: int = 1) -> int:
    """Training batches per rank and epoch."""
    return len(_batches(len(load_questions(cfg.textvqa, "train")), cfg, 0, world_size, 0, "train"))


class Examples(Dataset):
    """Question i → its encoded sample (smolvlm.encode_example), or None when its image cannot be read."""

    def __init__(self, questions: list[Question], processor: Any) -> None:
        self.questions, self.processor = questions, processor

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        q = self.questions[i]
        try:
            image = read_image(q.image)
        except MediaError as e:  # a missing file too: read_image reports every OSError as MediaError
            log.warning("textvqa: skipping question %s: %s", q.question_id, e)
            return None
        return {**smolvlm.encode_example(self.processor, [image], q.prompt, q.answer), "key": q.question_id}


def _collate(items: list[dict[str, Any] | None], pad_id: int) -> dict[str, Any]:
    samples = [s for s in items if s is not None]
    batch = smolvlm.collate(samples, pad_id) if samples else {}
    return {**batch, "keys": [s["key"] for s in samples], "skipped": {"bad_media": len(items) - len(samples)}}


def _indexed(batches: Iterator[dict[str, Any]], start: int) -> Iterator[dict[str, Any]]:
    for index, batch in enumerate(batches, start):
        yield {**batch, "index": index}


def make_loader(
    cfg: DataConfig,
    processor: Any,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    skip_batches: int = 0,
    split: str = "train",
) -> Iterator[dict[str, Any]]:
    """This rank's batches for one epoch of `split`, after its first `skip_batches` (exact resume).

    Training uses `cfg.subset` questions (all when 0) in a (seed, epoch) order; validation reads the val
    file in order. Ranks take every world_size-th question, the same number each.
    """
    questions = load_questions(cfg.textvqa, split)
    batches = _batches(len(questions), cfg, rank, world_size, epoch, split)[skip_batches:]
    pad = processor.tokenizer.pad_token_id
    loader = DataLoader(
        Examples(questions, processor),
        batch_sampler=batches,
        collate_fn=partial(_collate, pad_id=processor.tokenizer.eos_token_id if pad is None else pad),
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return _indexed(iter(loader), skip_batches)


def show_example(model: Any, processor: Any, root: str | Path, index: int = 0) -> dict[str, Any]:
    """Answer validation question `index` and print the question, the prediction and the 10 answers."""
    q = load_questions(root, "val")[index]
    prediction = smolvlm.generate(model.eval(), processor, [read_image(q.image)], q.prompt)
    print(f"question:   {q.question}\nprediction: {prediction}\nanswers:    {', '.join(q.answers)}")
    return {"question": q.question, "prediction": prediction, "answers": list(q.answers)}
