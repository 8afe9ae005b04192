"""WebDataset shards → padded training batches, split once across ranks and workers, resumable.

Shard format (one sample = the tar members sharing a key):
  KEY.json   pre-tokenized `token_ids` + `loss_mask`, or `user` + `assistant`, or a legacy `caption`;
             in stage 3 `user` + `chosen` + `rejected`
  media      numbered frames KEY.000.jpg, KEY.001.jpg, … | one KEY.mp4 (or webm/mkv/avi/mov) |
             one KEY.jpg (or png/webp/…) | nothing: a text-only sample (T = 0), kept.

Each worker runs: its shards → tar samples → seeded shuffle buffer → optional text-only interleave →
grouping into batches → decoding → collate. Everything before decoding looks only at raw bytes and
member names, so batch boundaries do not depend on whether a sample decodes: a sample that fails
(corrupt media, malformed JSON) is dropped from its batch and counted, and a resumed loader can skip
whole batches without decoding them.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from collate import collate, group_batches
from config import DataConfig
from frames import IMAGE_EXTS, MediaError, load_image, load_video, probe_video, read_image, sample_indices, to_tensor
from tokenization import encode_sample

log = logging.getLogger(__name__)

VIDEO_EXTS = frozenset({"mp4", "webm", "mkv", "avi", "mov"})
_NUMBERED = re.compile(r"(\d+)\.(\w+)")


def expand_shards(spec: str | list[str] | None) -> list[str]:
    """Brace lists and globs → shard paths, in a deterministic order every rank agrees on.

    A glob that matches nothing is an error (a typo would otherwise train on nothing); other entries
    (plain paths, `pipe:` or http URLs) are passed through for WebDataset to open.
    """
    out: list[str] = []
    for pattern in [spec] if isinstance(spec, str) else spec or []:
        for path in braceexpand.braceexpand(pattern):
            if re.search(r"[*?\[]", path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no shards match {path!r}")
                out.extend(matches)
            else:
                out.append(path)
    return out


def _slot_shards(shards: list[str], slot: int, slots: int, rng: random.Random | None) -> list[str]:
    """This (rank, worker) slot's share: every shard goes to exactly one slot; `rng` shuffles first."""
    order = list(shards)
    if rng is not None:
        rng.shuffle(order)
    return order[slot::slots]


def _read(shards: list[str], counts: Counter) -> Iterator[dict]:
    """Raw samples (`__key__`, `json`, `000.jpg`, …) of each shard in turn; an unreadable shard is counted."""
    for url in shards:
        try:
            yield from tarfile_samples([{"url": url}])
        except Exception as e:  # tar, gzip and transport errors all mean the rest of this shard is lost
            counts["bad_shard"] += 1
            log.warning("data: skipping the rest of shard %s: %s", url, e)


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


def _interleave(main: Iterator[Any], text: Iterator[Any], ratio: float) -> Iterator[Any]:
    """Position i of the output is a text sample when floor((i+1)·ratio) > floor(i·ratio): an exact,
    evenly spread share of `ratio`; the mix ends when `main` does."""
    for i in itertools.count():
        if math.floor((i + 1) * ratio) > math.floor(i * ratio):
            yield next(text)
        else:
            item = next(main, None)
            if item is None:
                return
            yield item


def media_of(raw: dict) -> tuple[str, list[bytes]]:
    """("frames" | "video" | "image" | "text", payloads), decided from member names alone."""
    numbered = sorted((int(m[1]), k) for k in raw if (m := _NUMBERED.fullmatch(k)) and m[2] in IMAGE_EXTS)
    if numbered:
        return "frames", [raw[k] for _, k in numbered]
    for kind, exts in (("video", VIDEO_EXTS), ("image", IMAGE_EXTS)):
        for k in raw:
            if k in exts:
                return kind, [raw[k]]
    return "text", []


class ShardDataset(IterableDataset):
    """One epoch of one rank's batches; in each DataLoader worker, that worker's share of them.

    Shards are shuffled with (seed, epoch) — the same order on every rank — then dealt out once to
    the global slots rank·W + worker. The sample shuffle buffer is seeded with (seed, epoch, slot).
    Each worker drops its first `skip_batches` batches without decoding them. Yields collated batches
    (collate.py's format) plus `keys` (the samples' keys) and `skipped` (per-reason counts of samples
    and shards lost since the worker's previous batch: bad_json, bad_media, bad_shard).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        skip_batches: int = 0,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.rank, self.world_size, self.epoch, self.skip_batches = rank, world_size, epoch, skip_batches
        self.shards = expand_shards(cfg.train_shards if split == "train" else cfg.val_shards)
        if not self.shards:
            raise ValueError(f"no {split} shards configured (data.{split}_shards)")
        mixing = split == "train" and cfg.text_ratio > 0
        self.text_shards = expand_shards(cfg.text_shards) if mixing else []
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad

    def _rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(map(str, (self.cfg.seed, self.epoch, *parts))))

    def _stream(self, shards: list[str], slot: int, slots: int, counts: Counter, name: str) -> Iterator[dict]:
        train = self.split == "train"
        mine = _slot_shards(shards, slot, slots, self._rng(name) if train else None)
        raw = _read(mine, counts)
        if train and self.cfg.shuffle_buffer > 1:
            raw = _shuffled(raw, self.cfg.shuffle_buffer, self._rng(name, slot))
        return raw

    def _text_stream(self, slot: int, slots: int, counts: Counter) -> Iterator[dict]:
        """Endless text-only samples: the slot's text shards, reshuffled on every pass. With fewer
        shards than slots, slots share shards (retention data repeats anyway)."""
        mine = _slot_shards(self.text_shards, slot, slots, None) or [self.text_shards[slot % len(self.text_shards)]]
        for rep in itertools.count():
            got = False
            for raw in self._stream(mine, 0, 1, counts, f"text{rep}.{slot}"):
                got = True
                yield raw
            if not got:
                raise ValueError(f"text shards {mine} hold no samples")

    def _num_frames(self, raw: dict) -> int:
        """The T a sample will decode to, from member names (and a container probe for videos)."""
        kind, media = media_of(raw)
        if kind == "frames":
            return min(len(media), self.cfg.max_frames)
        if kind == "image":
            return self.cfg.replicate_image_frames
        if kind == "video":
            try:
                return len(sample_indices(*probe_video(media[0]), self.cfg.max_frames, self.cfg.fps))
            except ValueError:  # MediaError included: decoding fails too and counts the sample
                return 0
        return 0

    def _frames(self, raw: dict) -> torch.Tensor:
        cfg, size = self.cfg, self.cfg.frame_size
        kind, media = media_of(raw)
        if kind == "frames":
            idx = sample_indices(len(media), 1.0, cfg.max_frames)
            return to_tensor([read_image(media[i], size) for i in idx], size)
        if kind == "video":
            return load_video(media[0], cfg.max_frames, cfg.fps, size=size)
        if kind == "image":
            return load_image(media[0], size).repeat(cfg.replicate_image_frames, 1, 1, 1)
        return torch.zeros(0, 3, size, size)

    def _decode(self, raw: dict, counts: Counter) -> dict | None:
        where = f"{raw.get('__url__')}:{raw['__key__']}"
        try:
            if "json" not in raw:
                raise ValueError("no JSON member")
            sample = encode_sample(self.tokenizer, json.loads(raw["json"]), self.cfg.stage, self.cfg.max_text_len)
        except (ValueError, KeyError, TypeError) as e:
            counts["bad_json"] += 1
            log.warning("data: skipping %s: bad JSON: %s", where, e)
            return None
        try:
            sample["frames"] = self._frames(raw)  # (T,3,S,S)
        except MediaError as e:
            counts["bad_media"] += 1
            log.warning("data: skipping %s: %s", where, e)
            return None
        sample["key"] = raw["__key__"]
        return sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        counts: Counter = Counter()
        raw = self._stream(self.shards, slot, slots, counts, "samples")
        if self.text_shards:
            raw = _interleave(raw, self._text_stream(slot, slots, counts), self.cfg.text_ratio)
        groups = group_batches(raw, self.cfg.batch_size, self.cfg.frame_budget, self._num_frames)
        for group in itertools.islice(groups, self.skip_batches, None):
            samples = [s for s in (self._decode(r, counts) for r in group) if s is not None]
            if not samples:  # every sample failed: nothing to train on (see make_loader on resume)
                continue
            batch: dict[str, Any] = collate(samples, self.pad_id)
            batch["keys"] = [s["key"] for s in samples]
            batch["skipped"] = dict(counts)
            counts.clear()
            yield batch


def make_loader(
    cfg: DataConfig,
    tokenizer: Any,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    skip_batches: int = 0,
    split: str = "train",
) -> Iterator[dict]:
    """This rank's batches for one epoch, after its first `skip_batches` (exact resume).

    With W = cfg.num_workers > 0 the DataLoader takes batches round-robin from workers 0..W-1, so the
    first N batches of the epoch are each worker's first N//W plus one more from workers 0..N%W-1.
    Each worker skips N//W batches itself (cheaply: no decoding) and the N%W extra ones are dropped
    here after decoding. Limits: the result equals the uninterrupted stream whenever
    N <= W x (the fewest batches any of this rank's workers yields this epoch). Past that point, in an
    epoch's ragged end where workers run out at different times, a resumed stream repeats a few of
    the epoch's last batches (it never drops one: checked by simulating the round-robin). A skipped
    batch whose every sample failed to decode is also off by one, since it was never yielded.
    """
    workers = cfg.num_workers
    dataset = ShardDataset(cfg, tokenizer, split, rank, world_size, epoch, skip_batches // max(workers, 1))
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())
    return itertools.islice(loader, skip_batches % workers, None)


def throughput(
    tokenizer: Any,
    num_workers: int = 1,
    num_samples: int = 32,
    frames_per_sample: int = 64,
    source_size: tuple[int, int] = (320, 240),
    frame_size: int = 224,
    batch_size: int = 4,
) -> dict[str, float]:
    """Loader speed on synthetic JPEG-sequence samples (the bench.py "data loader" row).

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
        cfg = DataConfig(
            train_shards=str(Path(tmp) / "bench-*.tar"),
            batch_size=batch_size,
            max_frames=frames_per_sample,
            frame_size=frame_size,
            num_workers=num_workers,
            shuffle_buffer=0,
        )
        start = time.perf_counter()
        seen = sum(len(batch["keys"]) for batch in make_loader(cfg, tokenizer))
        rate = seen / (time.perf_counter() - start)
    return {"samples_per_s": rate, "samples_per_s_per_worker": rate / shards, "workers": float(num_workers)}
