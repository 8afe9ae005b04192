"""Media → normalised frame tensors, the one place where pixels enter the project.

Everything (training shards, benchmarks, the demo) goes through these functions so that a frame is
resized and normalised the same way everywhere: squashed to size×size with PIL's bilinear filter
(antialiased when shrinking), or letterboxed (longest side to `size`, centred on black), then normalised
with the vision tower's mean and std (ImageNet's by default, as DINOv2 was trained and fVLM was published).
Videos are decoded with decord when it imports and opens the clip, else with PyAV (decord has no
wheels for several platforms and rejects some containers PyAV reads).
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from cli import UserError

try:
    import decord
except ImportError:  # optional: PyAV decodes everything decord does, only slower when seeking
    decord = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif"})

Source = str | Path | bytes


@dataclass
class FrameSpec:
    """How a model is fed: the frame size, the frames sampled from a video, how many copies make an image a still
    clip, and the sampling rate (None: `max_frames` spread over the whole clip). A model is saved with the spec it
    was trained on, so every command that loads it reads its media the same way."""

    size: int = 224
    max_frames: int = 64
    image_frames: int = 8
    fps: float | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the vision tower's normalisation
    std: tuple[float, float, float] = IMAGENET_STD
    letterbox: bool = False  # longest side to `size` on a black square instead of squashing

    def tensor(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Images → (T, 3, size, size) as this model is fed."""
        return to_tensor(images, self.size, self.mean, self.std, self.letterbox)


class MediaError(UserError, ValueError):
    """Media that cannot be decoded (corrupt, truncated, empty, unsupported); names its source."""


def _name(src: Source) -> str:
    return f"<{len(src)} bytes>" if isinstance(src, bytes) else str(src)


def _open(src: Source):
    return io.BytesIO(src) if isinstance(src, bytes) else str(src)


def letterboxed(image: Image.Image, size: int) -> Image.Image:
    """The image with its longest side scaled to `size`, centred on a black size×size square."""
    w, h = image.size
    scale = size / max(w, h)
    inner = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(inner, ((size - inner.size[0]) // 2, (size - inner.size[1]) // 2))
    return canvas


def to_tensor(
    images: Sequence[Image.Image | np.ndarray],
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    letterbox: bool = False,
) -> torch.Tensor:
    """PIL images or HWC uint8 arrays → (T,3,size,size) float32, normalised with `mean` / `std`."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        im = (Image.fromarray(im) if isinstance(im, np.ndarray) else im).convert("RGB")
        out[i] = np.asarray(letterboxed(im, size) if letterbox else im.resize((size, size), Image.BILINEAR))
    # Transpose while still uint8 (a quarter of the bytes), then normalise in one fused pass: x·a + b.
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().float()  # (T,3,S,S)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return x.mul_(1 / (255 * s)).add_(-m / s)


def sample_indices(
    num_frames: int,
    native_fps: float,
    max_frames: int,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """Frame indices spread uniformly over the clip (or its [start, end] seconds), at most max_frames.

    With `fps`, the count is the window's duration × fps (at least 1), still capped at max_frames and
    at the frames available. Each index is the centre of its equal-length segment, so a clip with
    fewer frames than asked for returns every frame exactly once.
    """
    if num_frames <= 0:
        return []
    timed = fps is not None or start is not None or end is not None
    if timed and not native_fps > 0:
        raise ValueError("time-based sampling needs the clip's frame rate")
    lo = 0 if start is None else min(max(math.ceil(start * native_fps), 0), num_frames - 1)
    hi = num_frames if end is None else min(max(math.floor(end * native_fps) + 1, lo + 1), num_frames)
    span = hi - lo
    count = min(span, max_frames)
    if fps is not None:
        count = min(count, max(1, math.floor(span / native_fps * fps)))
    return [lo + int((i + 0.5) * span / count) for i in range(count)]


def load_image(src: Source, size: int = 224) -> torch.Tensor:
    """One image file or its bytes → (1,3,size,size)."""
    return to_tensor([read_image(src, size)], size)


def read_image(src: Source, size: int | None = None) -> Image.Image:
    """Decode an image fully (so truncation shows up here, not later) as RGB.

    With `size`, a JPEG at least twice that large is decoded at a reduced scale (libjpeg's DCT scaling,
    never below size×size), several times faster for the 64 frames of a training sample.
    """
    _exists(src)
    try:
        with Image.open(_open(src)) as im:
            if size is not None:
                im.draft("RGB", (size, size))
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot decode image {_name(src)}: {e}") from e


class MediaMissing(MediaError, FileNotFoundError):
    """A media file that is not there: skipped and counted wherever undecodable media are (a MediaError), and a
    FileNotFoundError to whoever asks for one."""


def _exists(src: Source) -> None:
    """A missing file is said to be missing, before any decoder runs (they would call it undecodable, and FFmpeg and
    decord print lines of their own first)."""
    if not isinstance(src, bytes) and not Path(src).is_file():
        raise MediaMissing(f"{src}: no such file")


@contextmanager
def _native_stderr_quiet() -> Iterator[None]:
    """Silence what FFmpeg and decord write straight to file descriptor 2 while they try a clip: a failure is reported
    once, as a MediaError naming the file and each decoder's reason, not as their lines before it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decord_probe(src: Source) -> tuple[object, int, float]:
    if decord is None:
        raise MediaError("decord is not installed")
    vr = decord.VideoReader(_open(src))
    return vr, len(vr), float(vr.get_avg_fps())


def _pyav_probe(src: Source) -> tuple[int, float]:
    with av.open(_open(src)) as c:
        if not c.streams.video:
            raise MediaError(f"no video stream in {_name(src)}")
        s = c.streams.video[0]
        rate = float(s.average_rate or s.guessed_rate or 0)
        n = s.frames or sum(1 for p in c.demux(s) if p.size)  # some containers omit the count
    return n, rate


def _pyav_frames(src: Source, indices: list[int]) -> list[np.ndarray]:
    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    with av.open(_open(src)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(s)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    if len(got) < len(wanted):
        raise MediaError(f"video {_name(src)} ended after {len(got)} of the {len(wanted)} frames sampled")
    return [got[i] for i in indices]


def probe_video(src: Source, backend: str | None = None) -> tuple[int, float]:
    """(frame count, native fps) read from the container without decoding frames."""
    _exists(src)
    errors = []
    for name in (backend,) if backend else ("decord", "pyav"):
        try:
            with _native_stderr_quiet():
                return _decord_probe(src)[1:] if name == "decord" else _pyav_probe(src)
        except Exception as e:  # decord and FFmpeg raise many unrelated types
            errors.append(f"{name}: {e}")
    raise MediaError(f"cannot read video {_name(src)}: {'; '.join(errors)}")


def video_frames(
    src: Source,
    max_frames: int = 64,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    backend: str | None = None,
) -> list[np.ndarray]:
    """A video file or its bytes → its T ≤ max_frames sampled frames (RGB HWC uint8), as `sample_indices` says.

    `backend` forces "decord" or "pyav"; by default decord is tried first and PyAV takes over on any
    failure, so a clip is rejected (MediaError) only when neither can decode it.
    """
    if backend not in (None, "decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r}")
    _exists(src)
    errors = []
    for name in (backend,) if backend else ("decord", "pyav"):
        try:
            with _native_stderr_quiet():
                arrays = _decoded(name, src, max_frames, fps, start, end)
            if not arrays:
                raise MediaError("no frames")
            return arrays
        except Exception as e:  # decord and FFmpeg raise many unrelated types
            errors.append(f"{name}: {e}")
    raise MediaError(f"cannot decode video {_name(src)}: {'; '.join(errors)}")


def _decoded(
    name: str, src: Source, max_frames: int, fps: float | None, start: float | None, end: float | None
) -> list[np.ndarray]:
    if name == "decord":
        vr, n, rate = _decord_probe(src)
        idx = sample_indices(n, rate, max_frames, fps, start, end)
        return list(vr.get_batch(idx).asnumpy()) if idx else []
    n, rate = _pyav_probe(src)
    idx = sample_indices(n, rate, max_frames, fps, start, end)
    return _pyav_frames(src, idx) if idx else []


def load_video(
    src: Source,
    max_frames: int = 64,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    size: int = 224,
    backend: str | None = None,
) -> torch.Tensor:
    """A video file or its bytes → (T,3,size,size) ImageNet-normalised (see `video_frames`)."""
    return to_tensor(video_frames(src, max_frames, fps, start, end, backend), size)


@dataclass
class Media:
    """Where one question's pixels are: nothing, one image, one video, or an ordered list of frame images."""

    kind: str  # "none" | "image" | "video" | "frames"
    items: list[Path | bytes] = field(default_factory=list)
    start: float | None = None  # seconds: the window of a video or of a frame list to sample from
    end: float | None = None
    fps: float | None = None  # the rate a frame list was extracted at (None: unknown)

    def frame_indices(self, count: int, spec: FrameSpec) -> list[int]:
        """Which of a frame list's `count` images a model fed by `spec` sees: at the spec's fps where the list's own
        rate is known (its window too), else taken to be at the training rate already (the published shards hold
        frames extracted at 1 fps); at most `max_frames`, spread over the clip."""
        fps = spec.fps if self.fps is not None else None
        return sample_indices(count, self.fps or 1.0, spec.max_frames, fps, self.start, self.end)

    def pictures(self, spec: FrameSpec) -> list[Image.Image | np.ndarray]:
        """The frames decoded as `spec` feeds a model: a video at the spec's fps (every rate when it has none) over
        the clip or its window, at most `max_frames` spread uniformly; a frame list likewise (`frame_indices`); an
        image repeated `image_frames` times; none for text alone. The one rule from media to frames: training's
        processors, the benchmark harness, chat, the app and the lmms-eval model all read through it."""
        if self.kind == "video":
            return video_frames(self.items[0], spec.max_frames, spec.fps, start=self.start, end=self.end)
        if self.kind == "image":
            return [read_image(self.items[0], spec.size)] * spec.image_frames
        if self.kind == "frames":
            return [read_image(self.items[i], spec.size) for i in self.frame_indices(len(self.items), spec)]
        return []

    def frames(self, spec: FrameSpec) -> torch.Tensor:
        """(T, 3, size, size) as `spec` feeds a model (see `pictures`)."""
        pictures = self.pictures(spec)
        return spec.tensor(pictures) if pictures else torch.zeros(0, 3, spec.size, spec.size)

    def image(self) -> Image.Image:
        if self.kind != "image":
            raise ValueError(f"expected an image, this question has {self.kind} media")
        return read_image(self.items[0])

    @classmethod
    def at(cls, path: str | Path | None) -> Media:
        """The Media of a file: an image by its extension, else a video; none for a text-only question."""
        if path is None:
            return cls("none")
        kind = "image" if Path(path).suffix.lower().lstrip(".") in IMAGE_EXTS else "video"
        return cls(kind, [Path(path)])
