"""Readers of each training layout: units of work, and the raw samples in each unit.

A reader's `units()` is a list dealt out once per epoch across the ranks (a shard, or one record of a JSON
layout); `samples(unit)` yields raw samples in the processors' form (`__key__`, `json`, media members whose
values are bytes or file paths: see processors.py). The JSON layouts give paths, so a worker that does not
decode a sample never reads its image.

- `ShardReader`: WebDataset shards in the project's format (a tar that cannot be read is counted as bad_shard);
- `TextVQAReader`: TextVQA's published layout, each question asked with the short-answer prompt the benchmark
  evaluates with, answered by its most frequent answer;
- `CaptionReader`: captions in the Karpathy-split JSON or COCO 2017's layout (caption_sets.py), one sample per
  caption or per image (a caption drawn per epoch).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import tarfile_samples

from config import CaptionSource, ConfigError, ShardSource, SourceConfig, TextVQASource
from inputs.tokenization import CAPTION_PROMPT
from layouts import textvqa
from layouts.caption_sets import read_coco_captions, read_karpathy, training_samples
from layouts.shards import expand_shards

log = logging.getLogger(__name__)


class ShardReader:
    shuffled_within = False  # samples come in shard order: the loader's shuffle buffer mixes them

    def __init__(self, source: ShardSource) -> None:
        self.shards = expand_shards(source.path, must_exist=True)
        if not self.shards:
            raise ConfigError(f"the shards source {source.path!r} names no shard: give a glob, brace list or path")

    def units(self, epoch: int = 0) -> list[Any]:
        return list(self.shards)

    def samples(self, unit: Any, counts: Counter, epoch: int = 0) -> Iterator[dict]:
        try:
            yield from tarfile_samples([{"url": unit}])
        except Exception as e:  # tar, gzip and transport errors all mean the rest of this shard is lost
            counts["bad_shard"] += 1
            log.warning("data: skipping the rest of shard %s: %s", unit, e)

    def size(self) -> int | None:
        return None  # unknown without reading every shard


class TextVQAReader:
    shuffled_within = True  # units are single questions

    def __init__(self, source: TextVQASource, seed: int = 0) -> None:
        self.questions = textvqa.load_questions(source.root, source.split)
        n = len(self.questions)
        keep = range(n)
        if source.split == "train" and source.subset and source.subset < n:
            keep = sorted(random.Random(f"{seed}:subset").sample(range(n), source.subset))
        self.keep = list(keep)

    def units(self, epoch: int = 0) -> list[Any]:
        return list(self.keep)

    def samples(self, unit: Any, counts: Counter, epoch: int = 0) -> Iterator[dict]:
        q = self.questions[unit]
        yield {"__key__": q.question_id, "json": {"user": q.prompt, "assistant": q.answer}, "jpg": q.image}

    def size(self) -> int | None:
        return len(self.keep)


class CaptionReader:
    shuffled_within = True

    def __init__(self, source: CaptionSource, seed: int = 0) -> None:
        path = Path(source.file)
        images = source.images or None
        found = read_karpathy(path, images, source.split) if path.is_file() else read_coco_captions(path, source.split)
        self.records, self.per, self.seed = found.records, source.per, seed

    def units(self, epoch: int = 0) -> list[Any]:
        return [(s.id, s.image, s.caption) for s in training_samples(self.records, self.per, self.seed, epoch)]

    def samples(self, unit: Any, counts: Counter, epoch: int = 0) -> Iterator[dict]:
        key, image, caption = unit
        ext = Path(image).suffix.lower().lstrip(".") or "jpg"
        yield {"__key__": str(key), "json": {"user": CAPTION_PROMPT, "assistant": caption}, ext: Path(image)}

    def size(self) -> int | None:
        return len(self.units(0))


def open_reader(source: SourceConfig, seed: int = 0) -> ShardReader | TextVQAReader | CaptionReader:
    if isinstance(source, ShardSource):
        return ShardReader(source)
    if isinstance(source, TextVQASource):
        return TextVQAReader(source, seed)
    if isinstance(source, CaptionSource):
        return CaptionReader(source, seed)
    raise ValueError(f"no reader for data sources of kind {source.kind!r}")
