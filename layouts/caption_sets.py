"""Flickr30k and COCO captions in their published layouts → one plain record per image.

Layouts (ROOT = the images root, by default the folder holding the JSON):
  Karpathy split   dataset_flickr30k.json | dataset_coco.json = {"dataset": "flickr30k" | "coco", "images": [
                   {filename, split: train|val|test|restval, sentences: [{raw, …}], imgid, cocoid (COCO),
                   filepath (COCO, e.g. "val2014")}]}; images at ROOT/flickr30k-images/<filename> (Flickr30k)
                   or ROOT/<filepath>/<filename> (COCO)
  COCO 2017        ROOT/annotations/captions_{train,val}2017.json = {"images": [{id, file_name}],
                   "annotations": [{image_id, caption}]}; images at ROOT/{train,val}2017/<file_name>

Ids are strings: the Flickr photo id (the file name's stem) and the COCO image id (`cocoid`), so a COCO
image has one id in both layouts. "restval" is its own split here; Karpathy's COCO training set is
("train", "restval"). A record whose image file is absent is kept (its captions still serve as
references) unless asked otherwise, and always listed in `CaptionSet.missing_images`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval")
COCO_SPLITS = ("train", "val")
FLICKR30K_IMAGES = "flickr30k-images"
LAYOUTS = {
    "karpathy": "dataset_flickr30k.json or dataset_coco.json with a top-level 'images' list of {filename, split, "
    "sentences[].raw, imgid, cocoid (COCO), filepath (COCO)}; images at ROOT/flickr30k-images/<filename> "
    "(Flickr30k) or ROOT/<filepath>/<filename> (COCO)",
    "coco": "ROOT/annotations/captions_{train,val}2017.json with 'images' [{id, file_name}] and "
    "'annotations' [{image_id, caption}]; images at ROOT/{train,val}2017/<file_name>",
}


class CaptionSetMissing(FileNotFoundError):
    """A caption set's file is not where its layout says; the message names the file and the layout."""


@dataclass
class CaptionRecord:
    id: str
    image: Path
    captions: list[str]  # every reference caption of the image, whitespace-stripped, in file order
    split: str


@dataclass
class CaptionSample:
    """One training pair: an image and one of its captions."""

    id: str
    image: Path
    caption: str
    split: str


@dataclass
class CaptionSet:
    records: list[CaptionRecord]
    missing_images: list[Path] = field(default_factory=list)  # named by the file, absent on disk


def _splits(split: str | Iterable[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    wanted = allowed if split is None else (split,) if isinstance(split, str) else tuple(split)
    if bad := [s for s in wanted if s not in allowed]:
        raise ValueError(f"unknown split {bad[0]!r}; expected one of {allowed}")
    return wanted


def _load(path: Path, layout: str) -> dict[str, Any]:
    if not path.is_file():
        raise CaptionSetMissing(f"{path} not found. Expected layout: {LAYOUTS[layout]}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: no top-level 'images' list. Expected layout: {LAYOUTS[layout]}")
    return data


def _finish(records: list[CaptionRecord], source: Path, drop_missing: bool) -> CaptionSet:
    missing = [r.image for r in records if not r.image.is_file()]
    if missing:
        log.warning(
            "caption_sets: %d of %d images named in %s are missing (e.g. %s)%s",
            len(missing), len(records), source, missing[0], "; dropped" if drop_missing else "",
        )  # fmt: skip
        if drop_missing:
            absent = set(missing)
            records = [r for r in records if r.image not in absent]
    return CaptionSet(records, missing)


def read_karpathy(
    json_path: str | Path,
    images_root: str | Path | None = None,
    split: str | Iterable[str] | None = None,
    drop_missing: bool = False,
) -> CaptionSet:
    """Karpathy-split Flickr30k or COCO (told apart by the file's "dataset", else by `filepath`), in file order.

    `split`: one split, several (("train", "restval")), or None for all.
    """
    path = Path(json_path)
    root = path.parent if images_root is None else Path(images_root)
    wanted = _splits(split, KARPATHY_SPLITS)
    data = _load(path, "karpathy")
    dataset = data.get("dataset")
    if dataset not in ("flickr30k", "coco", None):
        raise ValueError(f"{path}: dataset {dataset!r} is not read here (flickr30k or coco)")
    records = []
    for img in data["images"]:
        if img.get("split") not in wanted:
            continue
        coco = dataset == "coco" or (dataset is None and "filepath" in img)
        try:
            name = img["filename"]
            image = root / img["filepath"] / name if coco else root / FLICKR30K_IMAGES / name
            id_ = str(img["cocoid"]) if coco else Path(name).stem
            captions = [s["raw"].strip() for s in img["sentences"]]
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: image {img.get('imgid')!r} lacks {e}. Expected layout: {LAYOUTS['karpathy']}"
            ) from e
        records.append(CaptionRecord(id_, image, captions, img["split"]))
    return _finish(records, path, drop_missing)


def read_coco_captions(
    root: str | Path, split: str | Iterable[str] | None = None, drop_missing: bool = False
) -> CaptionSet:
    """COCO 2017 captions (train and/or val), in the order of each file's `images` list.

    An image without any caption has no record (counted in a warning): it can neither train nor be scored.
    """
    root = Path(root)
    records = []
    for s in _splits(split, COCO_SPLITS):
        path = root / "annotations" / f"captions_{s}2017.json"
        data = _load(path, "coco")
        try:
            captions: dict[Any, list[str]] = {img["id"]: [] for img in data["images"]}
            for a in data["annotations"]:
                captions[a["image_id"]].append(a["caption"].strip())
            images = [(img["id"], img["file_name"]) for img in data["images"]]
        except KeyError as e:
            raise ValueError(f"{path}: missing key or unknown image id {e}. Expected layout: {LAYOUTS['coco']}") from e
        if uncaptioned := sum(not captions[i] for i, _ in images):
            log.warning("caption_sets: %d images in %s have no caption; left out", uncaptioned, path)
        records += [CaptionRecord(str(i), root / f"{s}2017" / f, captions[i], s) for i, f in images if captions[i]]
    return _finish(records, root / "annotations", drop_missing)


def training_samples(
    records: Iterable[CaptionRecord], per: str = "caption", seed: int = 0, epoch: int = 0
) -> list[CaptionSample]:
    """Expand records to training pairs: every caption (`per="caption"`), or one caption per image.

    With `per="image"` the caption is drawn from (seed, epoch, image id) alone, so the draw does not depend
    on the records' order or on which other records are present, and a new epoch draws afresh.
    """
    if per == "caption":
        return [CaptionSample(r.id, r.image, c, r.split) for r in records for c in r.captions]
    if per == "image":
        return [
            CaptionSample(r.id, r.image, random.Random(f"{seed}:{epoch}:{r.id}").choice(r.captions), r.split)
            for r in records
            if r.captions
        ]
    raise ValueError(f"per must be 'caption' or 'image', got {per!r}")
