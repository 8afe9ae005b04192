"""LLaVA-Instruct (Liu et al. 2023): GPT-written conversations about COCO images.

Layout: `llava_instruct_150k.json` (or `llava_v1_5_mix665k.json`, same entries), a JSON list of
{"id", "image", "conversations": [{"from": "human" | "gpt", "value"}, …]}; `image` is a path under
MEDIA (`000000033471.jpg` under COCO's `train2017/` for the 150K set, `coco/train2017/…`,
`gqa/images/…` under one root for the mix). An entry without `image` is a text-only sample (the mix
has ShareGPT ones). MEDIA defaults to the JSON's folder.

The `<image>` placeholder is removed: frames always come before the text in the model, so where the
placeholder stood decides nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from layouts.converters import Record, chat

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"\s*<image>\s*")


def strip_placeholder(text: str) -> str:
    """The text without `<image>`; the pieces around one are joined by a newline."""
    return "\n".join(p for p in PLACEHOLDER.split(text) if p).strip()


@lru_cache(maxsize=1)  # count() and records() read the file once
def _entries(src: Path) -> list[dict]:
    entries = json.loads(src.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{src}: expected a JSON list of conversations")
    return entries


def count(src: Path) -> int:
    return len(_entries(src))


def records(src: Path, media: Path | None) -> Iterator[Record]:
    root = media or src.parent
    for e in _entries(src):
        conv = e.get("conversations") or []
        roles = [ROLES.get(c.get("from")) for c in conv]
        text = chat((r, strip_placeholder(c.get("value") or "")) for r, c in zip(roles, conv, strict=True))
        problem = "bad_conversation" if None in roles else None
        images = (root / e["image"],) if e.get("image") else ()
        yield Record(id=str(e.get("id")), text=text, images=images, problem=problem)
