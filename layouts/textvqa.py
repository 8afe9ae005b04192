"""TextVQA (Singh et al. 2019) in its published layout: the questions, their ten answers and their images.

Layout (ROOT, a textvqa data source's `root`):
  ROOT/TextVQA_0.5.1_{train,val}.json   {"data": [{question_id, question, image_id, answers[10], …}]}
  ROOT/train_images/{image_id}.jpg      (the val questions' images live there too)

Training (readers.TextVQAReader) asks each question with the short-answer prompt the benchmark harness
evaluates with, and answers it with its most frequent answer.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

FILES = {"train": "TextVQA_0.5.1_train.json", "val": "TextVQA_0.5.1_val.json"}
IMAGES = "train_images"
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class TextVQAQuestion:
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
        # str.capitalize (which also lowercases the rest) as lmms-eval and eval_sets.py ask it: train as evaluated
        return self.question.capitalize() + SHORT_ANSWER_PROMPT


@lru_cache(maxsize=2)  # the converter counts, then reads: the file is parsed once
def entries(path: Path) -> list[dict]:
    """The question entries of one TextVQA JSON file, as published (the test split's have no answers)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: expected {{'data': [questions]}} (TextVQA_0.5.1_*.json)")
    return data["data"]


def load_questions(root: str | Path, split: str = "train") -> list[TextVQAQuestion]:
    """The questions of `split` (train | val), in file order."""
    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
    root = Path(root)
    path = root / FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"TextVQA {split}: {path} not found (expected {FILES[split]} in {root})")
    images = root / IMAGES
    return [
        TextVQAQuestion(str(q["question_id"]), q["question"], images / f"{q['image_id']}.jpg", tuple(q["answers"]))
        for q in entries(path)
    ]
