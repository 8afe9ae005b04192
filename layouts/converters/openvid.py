"""OpenVid-1M (Nan et al. 2024): video + caption pairs.

Layout: `OpenVid-1M.csv` (or `OpenVidHD.csv`; `data/train/` in the hub repository) with columns `video`
(the file name), `caption`, `aesthetic score`, `motion score`, `temporal consistency score`, `camera
motion`, `frame`, `fps`, `seconds`; the videos are the `OpenVid_part*.zip` archives unzipped flat into one
folder (`unzip -j OpenVid_partN.zip -d MEDIA`, as the dataset card says), `MEDIA/{video}`; MEDIA defaults
to the CSV's folder.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from layouts.converters import Record


def records(src: Path, media: Path | None) -> Iterator[Record]:
    root = media or src.parent
    with open(src, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield Record(id=row["video"], text={"caption": row.get("caption")}, video=root / row["video"])
