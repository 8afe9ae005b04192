"""SmolTalk (Allal et al. 2025): text-only chat, kept in stage 1 as retention data.

Layout: the hub's parquet files, `data/{subset}/train-0000K-of-0000N.parquet` (subset `all` or one
of its parts such as `smol-magpie-ultra`), with a column `messages` = [{"content", "role"}, …] and,
in `all`, `source` (the part a row comes from); or JSONL with one {"messages": […], …} per line. SRC
is one file or a folder searched for both (its test-* files left out). Rows have no id: a sample's id
is `FILE:ROW`, FILE relative to the folder.

A leading system message is kept as the conversation's first turn (it replaces the chat template's
default system prompt and the answers follow it); `--drop-system` removes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from layouts.converters import LayoutError, Record, chat, files, parquet_count, parquet_rows

SUFFIXES = (".parquet", ".jsonl")


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".parquet":
        for _, i, row in parquet_rows([path], ["messages", "source"]):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LayoutError(f"{path}, line {i + 1}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise LayoutError(f"{path}, line {i + 1}: not a JSON object, but {type(row).__name__}")
            yield i, row


def count(src: Path) -> int | None:
    paths = files(src, SUFFIXES)
    return parquet_count(paths) if all(p.suffix == ".parquet" for p in paths) else None


def records(src: Path, media: Path | None) -> Iterator[Record]:
    base = src if src.is_dir() else src.parent
    for path in files(src, SUFFIXES):
        name = path.relative_to(base).as_posix()
        for i, row in _rows(path):
            messages = row.get("messages")
            if not messages or not all(isinstance(m, dict) for m in messages):
                detail = "no 'messages' in the row" if messages is None else f"'messages' is {messages!r}"[:200]
                yield Record(id=f"{name}:{i}", text={}, problem="bad_conversation", detail=detail)
                continue
            text = chat((m.get("role"), m.get("content")) for m in messages)
            if row.get("source"):
                text["subset"] = row["source"]
            yield Record(id=f"{name}:{i}", text=text)
