"""TextVQA (Singh et al. 2019): questions that need the text in the picture read, 10 answers each.

Layout (read by layouts/textvqa.py, as training and evaluation read it): `TextVQA_0.5.1_{train,val}.json` =
{"dataset_name", …, "data": [{"question_id", "question", "image_id", "answers": [×10], "image_classes",
"flickr_original_url", "set_name", …}]}; images `train_images/{image_id}.jpg` beside the JSON, for val too
(MEDIA default). The test split has no answers: its entries are counted as `no_answers`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from layouts import textvqa
from layouts.converters import LayoutError, Record, most_frequent


def _entries(src: Path) -> list[dict]:
    try:
        return textvqa.entries(src)
    except (ValueError, UnicodeDecodeError) as e:  # not JSON, or not TextVQA's {"data": [...]}
        reason = f"is not a JSON file ({e})" if isinstance(e, json.JSONDecodeError | UnicodeDecodeError) else ""
        raise LayoutError(f"{src} {reason}" if reason else str(e)) from None


def count(src: Path) -> int:
    return len(_entries(src))


def records(src: Path, media: Path | None) -> Iterator[Record]:
    root = media or src.parent / "train_images"
    for q in _entries(src):
        answers = list(q.get("answers") or [])
        text = {"user": q.get("question"), "assistant": most_frequent(answers) if answers else None, "answers": answers}
        yield Record(
            id=str(q.get("question_id")),
            text=text,
            images=(root / f"{q.get('image_id')}.jpg",),
            problem=None if answers else "no_answers",
        )
