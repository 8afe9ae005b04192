"""VizWiz-VQA (Gurari et al. 2018): questions blind people asked about photos they took, 10 answers each.

Layout: `Annotations/{train,val}.json`, a JSON list of {"image": "VizWiz_train_00000000.jpg",
"question", "answers": [{"answer", "answer_confidence"}, ×10], "answer_type", "answerable"}; images in
`{train,val}/` beside `Annotations/` (MEDIA default: `../{split}` from the JSON, the split being its file
name). The test split has no answers: its entries are counted as `no_answers`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from layouts.converters import Record, json_list, most_frequent


@lru_cache(maxsize=1)  # count() and records() read the file once
def _entries(src: Path) -> list[dict]:
    return json_list(src, "questions ({image, question, answers})")


def count(src: Path) -> int:
    return len(_entries(src))


def records(src: Path, media: Path | None) -> Iterator[Record]:
    root = media or src.parent.parent / src.stem
    for e in _entries(src):
        answers = [a.get("answer") for a in e.get("answers") or []]
        text = {"user": e.get("question"), "assistant": most_frequent(answers) if answers else None, "answers": answers}
        image = e.get("image")
        yield Record(
            id=Path(image).stem if image else "",
            text=text,
            images=(root / image,) if image else (None,),
            problem=None if answers else "no_answers",
        )
