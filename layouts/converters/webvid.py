"""WebVid-2M/10M (Bain et al. 2021): stock-footage clips with their alt-text captions.

Layout: `results_2M_train.csv` / `results_10M_train.csv` (and `_val`) with columns `videoid`,
`contentUrl`, `duration`, `page_dir`, `name` (the caption). The dataset's download script saves each clip
as `MEDIA/{page_dir}/{videoid}.mp4` (MEDIA default: the CSV's folder); a flat `MEDIA/{videoid}.mp4`
is found too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from layouts.converters import Record, csv_rows


def records(src: Path, media: Path | None) -> Iterator[Record]:
    root = media or src.parent
    for row in csv_rows(src, ("videoid", "name")):
        vid = row["videoid"]
        video = root / (row.get("page_dir") or "") / f"{vid}.mp4"
        if not video.exists() and (root / f"{vid}.mp4").exists():
            video = root / f"{vid}.mp4"
        yield Record(id=vid, text={"caption": row.get("name")}, video=video)
