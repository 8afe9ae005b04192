"""RLAIF-V (Yu et al. 2024): preference pairs about images, stage 3's DPO data (83K pairs).

Layout: `RLAIF-V-Dataset_000.parquet` … (SRC: one file or the folder) with columns `ds_name`, `image`
(a Hugging Face Image cell {"bytes", "path"}), `question`, `chosen`, `rejected`, `origin_dataset`,
`origin_split`, `idx`, `image_path`. A sample's id is `idx`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from layouts.converters import Record, files, image_cell, parquet_count, parquet_rows

COLUMNS = ["image", "question", "chosen", "rejected", "idx"]


def count(src: Path) -> int:
    return parquet_count(files(src, (".parquet",)))


def records(src: Path, media: Path | None) -> Iterator[Record]:
    for path, i, row in parquet_rows(files(src, (".parquet",)), COLUMNS):
        text = {"user": row.get("question"), "chosen": row.get("chosen"), "rejected": row.get("rejected")}
        idx = row.get("idx")
        yield Record(
            id=f"{path.name}:{i}" if idx is None else str(idx),
            text=text,
            images=(image_cell(row.get("image"), media or path.parent),),
        )
