"""OpenVid-1M (Nan et al. 2024): video + caption pairs.

Layout: `OpenVid-1M.csv` (or `OpenVidHD.csv`; `data/train/` in the hub repository) with columns `video`
(the file name), `caption`, `aesthetic score`, `motion score`, `temporal consistency score`, `camera
motion`, `frame`, `fps`, `seconds`; the videos are the `OpenVid_part*.zip` archives unzipped flat into one
folder (`unzip -j OpenVid_partN.zip -d MEDIA`, as the dataset card says), `MEDIA/{video}`; MEDIA defaults
to the CSV's folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from layouts.converters import Record, csv_rows


def records(src: Path, media: Path | None) -> Iterator[Record]:
    root = media or src.parent
    for row in csv_rows(src, ("video", "caption")):
        yield Record(id=row["video"], text={"caption": row.get("caption")}, video=root / row["video"])
