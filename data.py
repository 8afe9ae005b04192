"""WebDataset shards → padded training batches, split once across ranks and workers, resumable.

Shard format (one sample = the tar members sharing a key):
  KEY.json   pre-tokenized `token_ids` + `loss_mask`, or `user` + `assistant`, or a legacy `caption`;
             in stage 3 `user` + `chosen` + `rejected`
  media      numbered frames KEY.000.jpg, KEY.001.jpg, … | one KEY.mp4 (or webm/mkv/avi/mov) |
             one KEY.jpg (or png/webp/…) | nothing: a text-only sample (T = 0), kept.

Numbered frames are sampled at `data.fps` when the sample's JSON states the rate they were extracted
at (`fps`); without it they are taken to be at the training rate already (the published shards hold
frames extracted at 1 fps), and `max_frames` of them are spread over the clip.

Each rank reads its own shards (dealt out once), and every DataLoader worker of the rank runs the same
deterministic stream: shards → tar samples → seeded shuffle buffer → optional text-only interleave →
grouping into batches; worker w then decodes and collates only the batches whose index it owns. So a
rank's sequence of batches does not depend on the number of workers, each sample is decoded once, and
resuming needs one number per rank (the batches consumed this epoch). Everything before decoding looks
only at raw bytes and member names, so batch boundaries do not depend on whether a sample decodes: a
sample that fails (corrupt media, malformed JSON) is dropped from its batch and counted, a batch that
loses every sample still takes its place in the sequence (as an empty marker), and a resumed loader
skips whole batches without decoding them.
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
    """This rank's share: every shard goes to exactly one rank; `rng` shuffles first."""
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
    """One epoch of one rank's batches; in each DataLoader worker, the batches whose index it owns.

    Shards are shuffled with (seed, epoch) — the same order on every rank — then dealt out once to the
    ranks. The sample shuffle buffer is seeded with (seed, epoch, rank), so all workers of a rank see one
    stream; with W workers, batch i (counted from the epoch's start) belongs to worker (i - skip) mod W,
    which is exactly the order the DataLoader collects them in. The first `skip_batches` are passed over
    without decoding. Yields collated batches (collate.py's format) plus `keys` (the samples' keys),
    `index` (the batch's place in the epoch) and `skipped` (per-reason counts of samples and shards lost
    since the previous batch: bad_json, bad_media, bad_shard); a batch whose every sample failed, and the
    read errors after the last batch, come as a marker with no `keys` but its `skipped` counts.
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
        key = "train_shards" if split == "train" else "val_shards"
        self.shards = expand_shards(getattr(cfg, key))
        if not self.shards:
            raise ValueError(f"no {split} shards configured (data.{key})")
        if len(self.shards) < world_size:
            raise ValueError(f"data.{key}: {len(self.shards)} shards cannot feed {world_size} processes")
        mixing = split == "train" and cfg.text_ratio > 0
        self.text_shards = expand_shards(cfg.text_shards) if mixing else []
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad

    def _rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(map(str, (self.cfg.seed, self.epoch, *parts))))

    def _stream(self, shards: list[str], counts: Counter, name: str) -> Iterator[dict]:
        train = self.split == "train"
        mine = _slot_shards(shards, self.rank, self.world_size, self._rng(name) if train else None)
        raw = _read(mine, counts)
        if train and self.cfg.shuffle_buffer > 1:
            raw = _shuffled(raw, self.cfg.shuffle_buffer, self._rng(name, self.rank))
        return raw

    def _text_stream(self, counts: Counter) -> Iterator[dict]:
        """Endless text-only samples: the rank's text shards, reshuffled on every pass. With fewer
        shards than ranks, ranks share shards (retention data repeats anyway)."""
        shards = self.text_shards
        if len(shards) < self.world_size:
            shards = [shards[self.rank % len(shards)]] * self.world_size
        for rep in itertools.count():
            got = False
            for raw in self._stream(shards, counts, f"text{rep}"):
                got = True
                yield raw
            if not got:
                raise ValueError(f"text shards {shards} hold no samples")

    def _frame_indices(self, count: int, raw: dict) -> list[int]:
        """Which of a frame sequence's `count` frames are used: at data.fps when the sample states the rate
        its frames were extracted at (JSON `fps`), else all of them (taken to be at the training rate),
        `max_frames` at most, spread uniformly."""
        native = None
        if self.cfg.fps is not None:
            try:
                native = json.loads(raw["json"]).get("fps")
            except (KeyError, ValueError, AttributeError):
                native = None  # the sample is counted as bad JSON when it is decoded
        if isinstance(native, (int, float)) and not isinstance(native, bool) and native > 0:
            return sample_indices(count, float(native), self.cfg.max_frames, self.cfg.fps)
        return sample_indices(count, 1.0, self.cfg.max_frames)

    def _num_frames(self, raw: dict) -> int:
        """The T a sample will decode to, from member names (and a container probe for videos)."""
        kind, media = media_of(raw)
        if kind == "frames":
            return len(self._frame_indices(len(media), raw))
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
            return to_tensor([read_image(media[i], size) for i in self._frame_indices(len(media), raw)], size)
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

    def _batch(self, group: list[dict], counts: Counter, index: int) -> dict[str, Any]:
        samples = [s for s in (self._decode(r, counts) for r in group) if s is not None]
        batch: dict[str, Any] = collate(samples, self.pad_id) if samples else {}
        return {**batch, "keys": [s["key"] for s in samples], "index": index, "skipped": dict(counts)}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        read: Counter = Counter()  # read errors (bad shards): every worker sees them; the next batch's owner reports
        raw = self._stream(self.shards, read, "samples")
        if self.text_shards:
            raw = _interleave(raw, self._text_stream(read), self.cfg.text_ratio)
        groups = group_batches(raw, self.cfg.batch_size, self.cfg.frame_budget, self._num_frames)
        index = -1
        for index, group in enumerate(groups):
            counts, mine = Counter(read), index >= self.skip_batches and (index - self.skip_batches) % workers == worker
            read.clear()
            if mine:
                yield self._batch(group, counts, index)
        end = index + 1  # lost after the last batch: one marker, from the worker whose turn comes next
        if read and end >= self.skip_batches and (end - self.skip_batches) % workers == worker:
            yield {"keys": [], "index": end, "skipped": dict(read)}


def make_loader(
    cfg: DataConfig,
    tokenizer: Any,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    skip_batches: int = 0,
    split: str = "train",
) -> Iterator[dict]:
    """This rank's batches (and empty markers, see ShardDataset) for one epoch, from index `skip_batches` on:
    the same sequence, whatever the number of workers, as the uninterrupted epoch's from that index (exact
    resume). The DataLoader asks workers 0..W-1 in turn, and batch skip + j belongs to worker j mod W."""
    dataset = ShardDataset(cfg, tokenizer, split, rank, world_size, epoch, skip_batches)
    if cfg.num_workers == 0:
        return iter(dataset)
    return iter(DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available()))


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
