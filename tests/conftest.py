"""Shared fixtures and media writers: the real SmolLM2 tokenizer, solid-colour JPEGs, tiny mp4 clips."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import tiny_model
from vlm import weights


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer, offline: weights.py converts the packaged GGUF once and caches it."""
    try:
        return weights.load_tokenizer(weights.PACKAGED)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models in one thread: a second one only contends with the other processes a test starts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, tokenizer):
    """A tiny foveated model saved as train.init_from reads it (a module that trains another kind overrides it)."""
    path = tmp_path_factory.mktemp("start") / "model"
    tiny_model(tokenizer=tokenizer).save_pretrained(path)
    return path


class Crash(Exception):
    """Stands in for a process dying between two steps."""


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    """A solid-colour JPEG, so decoded pixels are predictable."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def mp4(num_frames: int = 12, size: int = 32, fps: int = 12) -> bytes:
    """An MPEG-4 clip whose red channel ramps with the frame index (frame i has red ≈ 20·i)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(num_frames):
            a = np.zeros((size, size, 3), np.uint8)
            a[..., 0] = 20 * i % 256
            a[:, : size // 2, 1] = 200
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()
