"""Readers of the training sets' published layouts, one module per source, each yielding `Record`s.

A reader knows one layout (file names, columns, nesting) and nothing about shards: it only points at
the media (a path, or the bytes a parquet cell holds) and puts the text in one of the project's JSON
forms. The shard writer checks the media and the text and writes. Records come in a fixed order (files
sorted, rows in file order), so a conversion is reproducible and resumes by counting records.

Every module has `records(src, media) -> Iterator[Record]` (`media`: the folder of images or videos,
None for the layout's default) and may have `count(src) -> int` for the progress bar. Its docstring's
"Layout" paragraph is what an error shows when a file is not in that layout (`layout`).
"""

from __future__ import annotations

import csv
import importlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cli import UserError

NAMES = ("openvid", "webvid", "smoltalk", "cauldron", "llava", "vizwiz", "textvqa", "rlaifv")

Media = Path | bytes | None  # None: the layout names no media where it should (a null cell)


@dataclass(frozen=True)
class Record:
    """One sample as the source has it: its id, its text in a shard JSON form, where its media are."""

    id: str
    text: dict[str, Any]
    images: tuple[Media, ...] = ()  # one image, or several (written as numbered frames)
    video: Path | None = None
    problem: str | None = None  # a reason the reader already knows the sample is unusable (counted as such)
    detail: str | None = None  # what is wrong, in the source's own terms (its keys and values), for the report


class LayoutError(UserError, ValueError):
    """A source file that does not hold the layout its reader knows (a CSV given to a JSON reader, a missing
    column): one error naming the file, rather than every record counted as bad or none read at all."""


def layout(module: ModuleType) -> str:
    """The "Layout" paragraph of a reader module's docstring, on one line: what a wrong file is told to be."""
    paragraphs = (module.__doc__ or "").split("\n\n")
    found = next((p for p in paragraphs if p.startswith("Layout")), "")
    return re.sub(r"^Layout[^:]*:\s*", "", " ".join(found.split()))


def reader(name: str) -> ModuleType:
    """The reader module of source `name`."""
    if name not in NAMES:
        raise ValueError(f"unknown source {name!r}; one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def chat(messages: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """(role, content) pairs → `{"user", "assistant"}` for one plain exchange, else `{"turns": [...]}`.

    Contents are kept as given (the writer strips and checks them); roles must be system/user/assistant.
    """
    turns = [{"role": role, "content": content} for role, content in messages]
    if [t["role"] for t in turns] == ["user", "assistant"]:
        return {"user": turns[0]["content"], "assistant": turns[1]["content"]}
    return {"turns": turns}


def most_frequent(answers: list[str]) -> str:
    """The most frequent answer, the first given among equally frequent ones (as textvqa.py trains)."""
    return Counter(answers).most_common(1)[0][0]


HELD_OUT = ("test-", "validation-")  # the hub's held-out splits, which sit beside train-*.parquet in one folder


def files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`src` itself, or every file under the folder `src` ending in one of `suffixes`, in sorted order; in a
    folder, held-out splits (test-*, validation-*) are left out (name such a file itself to convert it)."""
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist")
    found = sorted(
        p for p in src.rglob("*") if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith(HELD_OUT)
    )
    if not found:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {src}")
    return found


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise LayoutError(f"{path} is not a parquet file ({e})") from None


def parquet_rows(paths: list[Path], columns: list[str] | None = None) -> Iterator[tuple[Path, int, dict]]:
    """(file, row number in the file, row) over parquet files, a few rows in memory at a time."""
    for path in paths:
        f = _parquet(path)
        names = [c for c in columns if c in f.schema_arrow.names] if columns else None
        row = 0
        for batch in f.iter_batches(batch_size=64, columns=names):
            for r in batch.to_pylist():
                yield path, row, r
                row += 1


def parquet_count(paths: list[Path]) -> int:
    return sum(_parquet(p).metadata.num_rows for p in paths)


def json_file(src: Path) -> Any:
    """A whole JSON file, parsed; a file that is not JSON is a LayoutError naming it."""
    try:
        return json.loads(src.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{src} is not a JSON file ({e})") from None


def json_list(src: Path, what: str) -> list[dict]:
    """A JSON file holding a list of objects (`what` says of what, for the error)."""
    entries = json_file(src)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LayoutError(f"{src} does not hold a JSON list of {what}")
    return entries


def csv_rows(src: Path, columns: tuple[str, ...]) -> Iterator[dict]:
    """The rows of a CSV file whose header must name `columns`: a file of another layout fails on its first
    line, not on every row."""
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                found = f"its first line reads {', '.join(header)[:120]!r}" if header else "it is empty"
                raise LayoutError(f"{src} is not a CSV with the columns {', '.join(columns)}: {found}")
            yield from reader
        except (UnicodeDecodeError, csv.Error) as e:
            raise LayoutError(f"{src} is not a CSV text file ({e})") from None


def image_cell(cell: Any, root: Path) -> Media:
    """A Hugging Face `Image` cell ({bytes, path}) → its bytes, or the file its path names under `root`."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return root / cell["path"]
    return None
