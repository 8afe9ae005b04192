"""The Cauldron (Laurençon et al. 2024): 50 vision-language sets in one format, stage 2's instruction data.

Layout: `{subset}/train-0000K-of-0000N.parquet` (e.g. `ai2d/`, `vqav2/`) with columns `images` = a list
of Hugging Face Image cells {"bytes", "path"} and `texts` = [{"user", "assistant", "source"}, …], one
entry per exchange about the same images. SRC is the collection's folder, one subset's folder or one
file; the subset is the parquet file's folder name (its parent's in the hub's converted layout,
`{subset}/train/0000.parquet`) and a sample's id is `SUBSET/FILE:ROW`.

Several exchanges become one multi-turn conversation; several images become numbered frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from layouts.converters import Record, chat, files, image_cell, parquet_count, parquet_rows


def count(src: Path) -> int:
    return parquet_count(files(src, (".parquet",)))


def records(src: Path, media: Path | None) -> Iterator[Record]:
    for path, i, row in parquet_rows(files(src, (".parquet",)), ["images", "texts"]):
        folder = path.parent
        subset = folder.parent.name if folder.name in ("train", "test", "validation") else folder.name
        turns = []
        for t in row.get("texts") or []:
            turns += [("user", t.get("user")), ("assistant", t.get("assistant"))]
        text = {**chat(turns), "subset": subset}
        images = tuple(image_cell(c, media or path.parent) for c in row.get("images") or [])
        problem, detail = (None, None) if turns else ("empty_text", "no exchange in 'texts'")
        if not images and not problem:
            problem, detail = "no_media", "no image in 'images'"
        yield Record(id=f"{subset}/{path.stem}:{i}", text=text, images=images, problem=problem, detail=detail)
