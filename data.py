"""Data sources → a model's padded training batches, dealt once across ranks, exactly resumable.

Each source (config.SourceConfig: shards, TextVQA, caption sets; readers.py) is a list of units dealt out
once per epoch to the ranks after a seeded shuffle. The first source of `data.train` sets the epoch: it
is read once per epoch; the others are mixed in by weight (a smooth weighted round-robin: over any stretch
each source's share is its weight's to within one sample; with `data.mix: batch`, within one batch, each
batch drawn from one source) and start over whenever they run out. So a mix of
captions with 14 % text-only retention data is `[{path: captions/*.tar, weight: 0.86}, {path: text/*.tar,
weight: 0.14}]`, and the realised shares are logged. Validation reads each `data.val` source once, in order.

Each rank reads its own units, and every DataLoader worker of the rank runs the same deterministic stream:
units → raw samples → seeded shuffle buffer (shards) → mix → grouping into batches; worker w then decodes
(the model's processor: processors.py) and collates only the batches whose index it owns. So a rank's
sequence of batches does not depend on the number of workers, each sample is decoded once, and resuming
needs one number per rank (the batches consumed this epoch). Everything before decoding looks only at member
names and JSON, so batch boundaries do not depend on whether a sample decodes: a sample that fails (corrupt
media, malformed JSON) is dropped from its batch and counted, a batch that loses every sample still takes its
place in the sequence (as an empty marker), and a resumed loader skips whole batches without decoding them.
A shard streamed from a command (`pipe:`, http, s3: readers.py) whose command fails stops the epoch with one
error rather than a skip: a download that fails in one worker might not in another, or on resume.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from collate import group_batches
from config import DataConfig, ShardSource
from inputs.frames import MediaError
from layouts.readers import UnreadableShard, open_reader
from layouts.shards import expand_shards

log = logging.getLogger(__name__)

__all__ = ["SourceDataset", "epoch_batches", "expand_shards", "make_loader", "throughput"]


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Buffered shuffle: each item leaves a `size`-slot buffer at a random time."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _weighted(streams: list[Iterator[Any]], weights: list[float]) -> Iterator[Any]:
    """Smooth weighted round-robin over `streams`; ends when the first one does (the others are endless)."""
    credit, total = [0.0] * len(streams), sum(weights)
    while True:
        credit = [c + w for c, w in zip(credit, weights, strict=True)]
        pick = max(range(len(streams)), key=credit.__getitem__)  # the first of equals
        credit[pick] -= total
        item = next(streams[pick], None)
        if item is None:
            if pick == 0:
                return
            raise ValueError(f"data source {pick} yields no sample")
        yield item


class SourceDataset(IterableDataset):
    """One epoch of one rank's batches; in each DataLoader worker, the batches whose index it owns.

    With W workers, batch i (counted from the epoch's start) belongs to worker (i - skip) mod W, which is
    exactly the order the DataLoader collects them in; the first `skip_batches` are passed over without
    decoding. Yields collated batches (the processor's format) plus `keys` (the samples' keys), `sources` (each
    sample's source index), `index` (the batch's place in the epoch) and `skipped` (per-reason counts of samples
    and shards lost since the previous batch: bad_json, bad_media, bad_shard); a batch whose every sample
    failed, and the read errors after the last batch, come as a marker with no `keys` but its `skipped` counts.
    A shard that cannot be read (UnreadableShard) ends the worker's stream with `{"error": message}`, which
    make_loader raises in the main process: one line, not a worker's traceback.
    """

    def __init__(
        self,
        cfg: DataConfig,
        processor: Any,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        skip_batches: int = 0,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.processor, self.split = cfg, processor, split
        self.rank, self.world_size, self.epoch, self.skip_batches = rank, world_size, epoch, skip_batches
        self.sources = cfg.train if split == "train" else cfg.val
        if not self.sources:
            raise ValueError(f"no {split} data configured (data.{split})")
        self.readers = [open_reader(s, cfg.seed) for s in self.sources]
        first = len(self.readers[0].units(epoch))
        if first < world_size:
            raise ValueError(f"data.{split}[0]: {first} units (shards or records) cannot feed {world_size} processes")

    def _rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(map(str, (self.cfg.seed, self.epoch, *parts))))

    def _stream(self, i: int, counts: Counter, rep: int = 0) -> Iterator[dict]:
        """This rank's samples of source i for the epoch (pass `rep` of a source that starts over)."""
        reader, train = self.readers[i], self.split == "train"
        units = reader.units(self.epoch)
        if train:
            self._rng("units", i, rep).shuffle(units)
        mine = units[self.rank :: self.world_size] or [units[self.rank % len(units)]]  # a small source is shared

        def raw() -> Iterator[dict]:
            for unit in mine:
                for sample in reader.samples(unit, counts, self.epoch):
                    yield {**sample, "__source__": i}

        samples = raw()
        if train and not reader.shuffled_within and self.cfg.shuffle_buffer > 1:
            samples = _shuffled(samples, self.cfg.shuffle_buffer, self._rng("samples", i, rep, self.rank))
        return samples

    def _endless(self, i: int, counts: Counter) -> Iterator[dict]:
        for rep in itertools.count():
            got = False
            for sample in self._stream(i, counts, rep):
                got = True
                yield sample
            if not got:
                raise ValueError(f"data.train[{i}] holds no samples")

    def raw_samples(self, counts: Counter) -> Iterator[dict]:
        """This rank's raw samples for the epoch, mixed as the module docstring says."""
        if self.split == "val":
            return itertools.chain.from_iterable(self._stream(i, counts) for i in range(len(self.readers)))
        if len(self.readers) == 1:
            return self._stream(0, counts)
        streams = [self._stream(0, counts)] + [self._endless(i, counts) for i in range(1, len(self.readers))]
        return _weighted(streams, [s.weight for s in self.sources])

    def groups(self, counts: Counter) -> Iterator[list[dict]]:
        """The epoch's batches of raw samples, before any decoding; with data.mix "batch", each from one source,
        the batches (rather than the samples) mixed by weight."""
        cfg = self.cfg

        def grouped(samples: Iterator[dict]) -> Iterator[list[dict]]:
            return group_batches(samples, cfg.batch_size, cfg.frame_budget, self.processor.num_frames)

        if self.split == "train" and cfg.mix == "batch" and len(self.readers) > 1:
            streams = [grouped(self._stream(0, counts))]
            streams += [grouped(self._endless(i, counts)) for i in range(1, len(self.readers))]
            return _weighted(streams, [s.weight for s in self.sources])
        return grouped(self.raw_samples(counts))

    def _decode(self, raw: dict, counts: Counter) -> dict | None:
        where = f"{raw.get('__url__', 'source ' + str(raw['__source__']))}:{raw['__key__']}"
        try:
            sample = self.processor.encode(raw)
        except MediaError as e:
            counts["bad_media"] += 1
            log.warning("data: skipping %s: %s", where, e)
            return None
        except (ValueError, KeyError, TypeError) as e:
            counts["bad_json"] += 1
            log.warning("data: skipping %s: bad JSON: %s", where, e)
            return None
        return {**sample, "key": raw["__key__"], "source": raw["__source__"]}

    def _batch(self, group: list[dict], counts: Counter, index: int) -> dict[str, Any]:
        samples = [s for s in (self._decode(r, counts) for r in group) if s is not None]
        batch: dict[str, Any] = self.processor.collate(samples) if samples else {}
        extra = {"keys": [s["key"] for s in samples], "sources": [s["source"] for s in samples]}
        return {**batch, **extra, "index": index, "skipped": dict(counts)}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        read: Counter = Counter()  # read errors (bad shards): every worker sees them; the next batch's owner reports
        index = -1
        try:
            for index, group in enumerate(self.groups(read)):
                counts = Counter(read)
                mine = index >= self.skip_batches and (index - self.skip_batches) % workers == worker
                read.clear()
                if mine:
                    yield self._batch(group, counts, index)
        except UnreadableShard as e:
            yield {"error": str(e)}
            return
        end = index + 1  # lost after the last batch: one marker, from the worker whose turn comes next
        if read and end >= self.skip_batches and (end - self.skip_batches) % workers == worker:
            yield {"keys": [], "sources": [], "index": end, "skipped": dict(read)}


def make_loader(
    cfg: DataConfig,
    processor: Any,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    skip_batches: int = 0,
    split: str = "train",
) -> Iterator[dict]:
    """This rank's batches (and empty markers, see SourceDataset) for one epoch, from index `skip_batches` on:
    the same sequence, whatever the number of workers, as the uninterrupted epoch's from that index (exact
    resume). The DataLoader asks workers 0..W-1 in turn, and batch skip + j belongs to worker j mod W."""
    dataset = SourceDataset(cfg, processor, split, rank, world_size, epoch, skip_batches)
    if cfg.num_workers == 0:
        return _raising(iter(dataset))
    workers = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())
    return _raising(iter(workers))


def _raising(batches: Iterator[dict]) -> Iterator[dict]:
    """The batches, until a worker's error marker, raised here as the error it stands for."""
    for batch in batches:
        if "error" in batch:
            break
        yield batch
    else:
        return
    del batches  # the workers stop now, not whenever the error's traceback is collected (seconds, then)
    raise UnreadableShard(batch["error"])


def epoch_batches(cfg: DataConfig, processor: Any, world_size: int = 1) -> int:
    """Training batches per rank and epoch (rank 0's count), for data of known size (not shards)."""
    if any(isinstance(s, ShardSource) for s in cfg.train):
        raise ValueError("shards have no known size: set 'train.max_steps', not 'train.epochs'")
    return sum(1 for _ in SourceDataset(cfg, processor, "train", 0, world_size).groups(Counter()))


def throughput(
    processor: Any,
    num_workers: int = 1,
    num_samples: int = 32,
    frames_per_sample: int = 64,
    source_size: tuple[int, int] = (320, 240),
    batch_size: int = 4,
) -> dict[str, float]:
    """Loader speed on synthetic JPEG-sequence samples (the bench.py "data loader" row), through `processor`
    (its frame settings decide the decoded size).

    Writes one shard per worker of `frames_per_sample`-frame samples (JPEGs of `source_size`), then
    times the real loader over all of them, worker start-up included (keep num_samples ≫ workers).
    Returns samples/s overall and per worker (W = 0 counts as one worker: the main process).
    """
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(8):  # a few distinct frames cycled: decoding cost does not depend on repetition
        w, h = source_size
        img = np.linspace(0, 255, w)[None, :, None] * 0.7 + rng.integers(0, 60, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    shards = max(num_workers, 1)
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(shards):
            with wds.TarWriter(str(Path(tmp) / f"bench-{s}.tar")) as sink:
                for i in range(s, num_samples, shards):
                    sample = {"__key__": f"s{i:06d}", "json": {"caption": "a synthetic clip"}}
                    sample.update({f"{f:03d}.jpg": jpegs[f % len(jpegs)] for f in range(frames_per_sample)})
                    sink.write(sample)
        source = ShardSource(path=str(Path(tmp) / "bench-*.tar"))
        cfg = DataConfig(train=[source], batch_size=batch_size, num_workers=num_workers, shuffle_buffer=0)
        start = time.perf_counter()
        seen = sum(len(batch["keys"]) for batch in make_loader(cfg, processor))
        rate = seen / (time.perf_counter() - start)
    return {"samples_per_s": rate, "samples_per_s_per_worker": rate / shards, "workers": float(num_workers)}
