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

import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from layouts.converters import Record, chat, json_list

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"\s*<image>\s*")


def strip_placeholder(text: str) -> str:
    """The text without `<image>`; the pieces around one are joined by a newline."""
    return "\n".join(p for p in PLACEHOLDER.split(text) if p).strip()


@lru_cache(maxsize=1)  # count() and records() read the file once
def _entries(src: Path) -> list[dict]:
    return json_list(src, "conversations ({id, image, conversations})")


def _problem(conv: object) -> str | None:
    """What keeps `conversations` from being a conversation, said in LLaVA's own keys (the shard's `turns` are
    the writer's word, which a user looking at the JSON would not find)."""
    if conv is None:
        return "no 'conversations' in the entry"
    if not isinstance(conv, list) or not conv:
        return f"'conversations' must be a non-empty list of {{from, value}}, got {conv!r}"[:200]
    for c in conv:
        if not isinstance(c, dict) or c.get("from") not in ROLES:
            return f"'conversations' holds {c!r}: each needs 'from' one of {', '.join(ROLES)} and 'value'"[:200]
    return None


def count(src: Path) -> int:
    return len(_entries(src))


def records(src: Path, media: Path | None) -> Iterator[Record]:
    root = media or src.parent
    for e in _entries(src):
        conv = e.get("conversations")
        images = (root / e["image"],) if e.get("image") else ()
        detail = _problem(conv)
        if detail:
            yield Record(id=str(e.get("id")), text={}, images=images, problem="bad_conversation", detail=detail)
            continue
        text = chat((ROLES[c["from"]], strip_placeholder(c.get("value") or "")) for c in conv)
        yield Record(id=str(e.get("id")), text=text, images=images)
