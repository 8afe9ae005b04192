"""Records of a source → WebDataset shards in the project's format: checked, resumable, reproducible.

Shard format (what data.py reads): one sample = the tar members sharing a key, the record's index in
the source's order (nine digits, so keys sort as the source does and trace back to it).
  KEY.json  {"source": NAME, "id": the source's own id, …} plus one conversation form:
              {"user", "assistant"}               one exchange; VizWiz/TextVQA add "answers" (all ten)
              {"turns": [{"role", "content"}, …]}  several exchanges; roles user/assistant, optionally a
                                                   leading "system" message (SmolTalk)
              {"caption"}                         a video's caption (OpenVid, WebVid)
              {"user", "chosen", "rejected"}      a preference pair (RLAIF-V)
            The Cauldron and SmolTalk add "subset". Texts are stripped of surrounding whitespace.
  media     KEY.mp4 (a video) | KEY.jpg, KEY.png, … (one image) | KEY.000.jpg, KEY.001.jpg, … (several
            images, or a re-encoded video) | nothing: a text-only sample, which the project keeps.

Media are copied as they come once they are known to decode (an image fully, a video at CHECK_FRAMES frames
spread over it), or, with `frame_size`/`max_frames`/`fps`, decoded through frames.py (uniform sampling,
squashed to frame_size²: the pixels training computes at that size) and stored as JPEG (a video as numbered
frames, an image as one KEY.jpg), so that training decodes a few small JPEGs instead of seeking in a video.
A sample whose text or media fail is left out and counted by reason (missing_file, undecodable_image,
undecodable_video, unsupported_video, empty_text, bad_conversation, no_media, no_answers), never dropped
silently.

Shard k holds the k-th `shard_size` good samples. It is written under a temporary name and renamed when
complete; then OUT/report.json is replaced (atomically) by one that lists the finished shards (name,
samples, sha256, records consumed), the per-reason counts and first examples, and the settings. A rerun
with the same settings skips the records consumed and continues with the next shard, so a killed and
resumed conversion writes the same bytes as an uninterrupted one. A rerun with other settings is refused
(OtherOptions) and changes nothing in the folder. An input not in the source's layout (no record read from
it, a missing column) is one error naming the file and the layout (LayoutError), not an empty conversion.
Workers only check and encode; results are taken in record order, so their number changes nothing in the
output.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from cli import UserError
from inputs.frames import IMAGENET_MEAN, IMAGENET_STD, MediaError, load_image, load_video, read_image, sample_indices
from inputs.tokenization import check_turns
from layouts.converters import LayoutError, Record, chat, layout, reader
from layouts.shards import VIDEO_EXTS

log = logging.getLogger(__name__)

REPORT = "report.json"

FORMAT_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
TEXT_FIELDS = ("user", "assistant", "caption", "chosen", "rejected")
CHECK_FRAMES, CHECK_SIZE = 8, 32  # a copied video is checked by decoding this many frames, this small
JPEG_QUALITY = 90
EXAMPLES = 10  # left-out samples named per reason in the report
LOG_EACH = 20  # left-out samples logged one by one per reason, then only counted
# the settings as prepare.py's command line names them, for an error that says which to change
FLAGS = {"source": "SOURCE", "in": "--in", "images": "--images", "shard_size": "--shard-size", "limit": "--limit",
         "frame_size": "--frame-size", "max_frames": "--max-frames", "fps": "--fps",
         "drop_system": "--drop-system"}  # fmt: skip


class OtherOptions(UserError, ValueError):
    """The output folder holds a conversion made with other options: continuing it would mix two outputs in one
    folder, and starting afresh would delete the shards already written."""


@dataclass(frozen=True)
class Options:
    """What decides the output bytes (with the source and its paths); the worker count does not."""

    shard_size: int = 1000
    limit: int | None = None  # only the first `limit` records of the source
    frame_size: int | None = None  # re-encode media as JPEG frames of this size (default 224 when re-encoding)
    max_frames: int | None = None  # … at most this many per video (default 64)
    fps: float | None = None  # … sampled at this rate instead of spread over the whole clip
    drop_system: bool = False  # remove a leading system message from conversations

    @property
    def reencode(self) -> bool:
        return self.frame_size is not None or self.max_frames is not None or self.fps is not None


class Skip(Exception):
    """A sample left out, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str):
        detail = re.sub(r" at 0x[0-9a-f]+", "", detail)  # object addresses would make the report differ run to run
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- one record → tar members


def _clean(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Skip("empty_text", f"no {what} text")
    return value.strip()


def _text(record: Record, opts: Options) -> dict[str, Any]:
    if record.problem:
        raise Skip(record.problem, record.detail or "as the source has it")
    text = dict(record.text)
    for k in TEXT_FIELDS:
        if k in text:
            text[k] = _clean(text[k], k)
    if "turns" in text:
        turns = [(t.get("role"), _clean(t.get("content"), f"{t.get('role')} turn")) for t in text.pop("turns")]
        if opts.drop_system and turns and turns[0][0] == "system":
            turns = turns[1:]
        text.update(chat(turns))
        if "turns" in text:
            try:
                check_turns(text["turns"])
            except ValueError as e:
                raise Skip("bad_conversation", str(e)) from e
    return text


def _read(src: Path | bytes | None) -> bytes:
    if src is None:
        raise Skip("no_media", "the source names no media for this sample")
    if isinstance(src, bytes):
        return src
    try:
        return Path(src).read_bytes()
    except OSError as e:
        raise Skip("missing_file", str(src)) from e


def _pixels(x: torch.Tensor) -> np.ndarray:
    """frames.py's normalised (T,3,S,S) back to the uint8 (T,S,S,3) it was computed from (exact after rounding)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _image(data: bytes, opts: Options) -> tuple[str, bytes]:
    """(extension, bytes) of one checked image: as it came, or re-encoded."""
    try:
        if opts.reencode:
            return "jpg", _jpeg(_pixels(load_image(data, opts.frame_size or 224))[0])
        decoded = read_image(data)
        with Image.open(io.BytesIO(data)) as im:
            ext = FORMAT_EXTS.get(im.format or "")
    except MediaError as e:
        raise Skip("undecodable_image", str(e)) from e
    if ext is None:  # a format data.py does not read (TIFF, …): stored losslessly as PNG
        buf = io.BytesIO()
        decoded.save(buf, format="PNG")
        return "png", buf.getvalue()
    return ext, data


def _video(path: Path, opts: Options) -> dict[str, bytes]:
    ext = path.suffix.lower().lstrip(".")
    if ext not in VIDEO_EXTS and not opts.reencode:
        raise Skip("unsupported_video", f"{path}: not one of {sorted(VIDEO_EXTS)}")
    data = _read(path)
    try:
        if not opts.reencode:
            load_video(data, CHECK_FRAMES, size=CHECK_SIZE)
            return {ext: data}
        frames = _pixels(load_video(data, opts.max_frames or 64, opts.fps, size=opts.frame_size or 224))
    except MediaError as e:
        raise Skip("undecodable_video", f"{path}: {e}") from e
    return {f"{i:03d}.jpg": _jpeg(a) for i, a in enumerate(frames)}


def _media(record: Record, opts: Options) -> dict[str, bytes]:
    if record.video is not None:
        return _video(record.video, opts)
    images = list(record.images)
    if len(images) > 1 and opts.max_frames:
        images = [images[i] for i in sample_indices(len(images), 1.0, opts.max_frames)]
    encoded = [_image(_read(src), opts) for src in images]
    if len(encoded) == 1:
        return dict(encoded)
    return {f"{i:03d}.{ext}": data for i, (ext, data) in enumerate(encoded)}


def encode(record: Record, source: str, opts: Options) -> tuple[dict[str, bytes] | None, str, str]:
    """(tar members by extension, "", "") for a good sample, (None, reason, detail) for one left out."""
    try:
        text = _text(record, opts)
        members = _media(record, opts)
    except Skip as e:
        return None, e.reason, e.detail
    meta = {"source": source, "id": record.id, **text}
    return {"json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(), **members}, "", ""


# ---------------------------------------------------------------- the run


def _worker_init() -> None:
    torch.set_num_threads(1)  # parallelism comes from the workers


def _encoded(stream: Iterator[tuple[int, Record]], source: str, opts: Options, workers: int) -> Iterator[tuple]:
    """((index, record), encode's result) in record order, `workers` processes encoding ahead."""
    if workers <= 1:
        for item in stream:
            yield item, encode(item[1], source, opts)
        return
    with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
        pending: deque = deque()
        for item in stream:
            pending.append((item, pool.submit(encode, item[1], source, opts)))
            if len(pending) >= 8 * workers:  # bounded: records with inline images hold memory
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _save(out: Path, report: dict) -> None:
    tmp = out / (REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out / REPORT)


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "given" if value else "not given"
    return str(value)


def _start(out: Path, settings: dict) -> dict:
    """The report to continue from: the one in `out` if its settings match, else a fresh one."""
    path = out / REPORT
    if not path.exists():
        return dict(settings=settings, complete=False, records=0, samples=0, skipped={}, examples={}, shards=[])
    report = json.loads(path.read_text())
    if report["settings"] != settings:
        before = report["settings"]
        diff = "; ".join(
            f"{FLAGS.get(k, k)} {_shown(before.get(k))} there, {_shown(v)} now"
            for k, v in settings.items()
            if before.get(k) != v
        )
        raise OtherOptions(
            f"{out} holds a conversion made with other options ({diff}): give another --out, or the same options "
            "to continue it"
        )
    for shard in report["shards"]:
        if not (out / shard["name"]).is_file():
            raise FileNotFoundError(f"{out / shard['name']} is listed in {path} but missing")
    return report


class _Shard:
    """One shard being written under a temporary name."""

    def __init__(self, out: Path, name: str):
        self.path, self.tmp = out / name, out / (name + ".tmp")
        self.file = open(self.tmp, "wb")  # closed in finish()
        self.sink = wds.TarWriter(self.file, encoder=False, mtime=0.0)
        self.samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        self.sink.write({"__key__": key, **members})
        self.samples += 1

    def finish(self) -> str:
        self.sink.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        digest = hashlib.sha256(self.tmp.read_bytes()).hexdigest()
        os.replace(self.tmp, self.path)
        return digest


def _skip(report: dict, record: Record, reason: str, detail: str) -> None:
    n = report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
    examples = report["examples"].setdefault(reason, [])
    if len(examples) < EXAMPLES:
        examples.append({"id": record.id, "detail": detail})
    if n <= LOG_EACH:
        log.warning("left out %s: %s: %s", record.id, reason, detail)
    if n == LOG_EACH:
        log.warning("further %s samples are counted, not logged", reason)


def convert(
    source: str, src: Path, media: Path | None, out: Path, opts: Options = Options(), workers: int = 1
) -> dict[str, Any]:
    """Convert (or continue converting) `source` read from `src` into shards `out/SOURCE-NNNNNN.tar`; returns
    the report (also in out/report.json)."""
    if opts.shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    module = reader(source)
    src = Path(src).resolve()
    settings = {"source": source, "in": str(src), "images": str(Path(media).resolve()) if media else None}
    settings.update(asdict(opts))
    out.mkdir(parents=True, exist_ok=True)
    report = _start(out, json.loads(json.dumps(settings)))
    if report["complete"]:
        log.info("%s: already complete (%d samples in %d shards)", out, report["samples"], len(report["shards"]))
        return report
    for stale in out.glob("*.tmp"):
        stale.unlink()
    try:
        done, shard = _write(module, source, src, media, out, opts, workers, report)
    except LayoutError as e:  # the file is not the source's: say what the reader expects
        raise LayoutError(f"{e}. prepare.py {source} reads {layout(module)}") from None
    if shard is not None:
        _close(out, report, shard, done)
    report.update(records=done, complete=True)
    _save(out, report)
    n, left_out = len(report["shards"]), report["skipped"] or "none"
    log.info("%s: %d samples in %d shards from %d records; left out: %s", out, report["samples"], n, done, left_out)
    return report


def _write(
    module: Any, source: str, src: Path, media: Path | None, out: Path, opts: Options, workers: int, report: dict
) -> tuple[int, _Shard | None]:
    """The records after those `report` has consumed, into shards (each closed as it fills); returns the records
    consumed in all and the last shard, still open when it is not full."""
    total = module.count(src) if hasattr(module, "count") else None
    if opts.limit is not None:
        total = opts.limit if total is None else min(total, opts.limit)
    done = report["records"]
    if done:
        log.info("%s: resuming after %d records and %d shards", out, done, len(report["shards"]))
    stream = islice(enumerate(module.records(src, Path(media) if media else None)), done, opts.limit)
    first = next(stream, None)  # before the progress bar: a file of another layout fails without drawing one
    if first is None and done == 0 and opts.limit != 0:  # such a file often parses to no record rather than failing
        raise LayoutError(f"{src} holds no {source} record")
    stream = chain([] if first is None else [first], stream)
    shard = None
    with tqdm(total=total, initial=done, unit="rec", desc=source, mininterval=1.0) as bar:
        for (i, record), (members, reason, detail) in _encoded(stream, source, opts, workers):
            done = i + 1
            bar.update(1)
            if members is None:
                _skip(report, record, reason, detail)
                continue
            if shard is None:
                shard = _Shard(out, f"{source}-{len(report['shards']):06d}.tar")
            shard.add(f"{i:09d}", members)
            if shard.samples == opts.shard_size:
                _close(out, report, shard, done)
                shard = None
                bar.set_postfix(samples=report["samples"], left_out=sum(report["skipped"].values()))
    return done, shard


def _close(out: Path, report: dict, shard: _Shard, done: int) -> None:
    digest = shard.finish()
    report["shards"].append({"name": shard.path.name, "samples": shard.samples, "records": done, "sha256": digest})
    report.update(records=done, samples=report["samples"] + shard.samples)
    _save(out, report)
