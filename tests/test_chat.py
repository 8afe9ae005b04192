"""End to end with the packaged real weights: a user's question about nothing, an image, and an mp4."""

from __future__ import annotations

import pytest
import torch

from chat import ask
from config import FoveatedConfig
from model import FoveatedVLM
from tests.conftest import jpeg, mp4


@pytest.fixture(scope="module")
def real_model():
    torch.manual_seed(0)
    return FoveatedVLM.from_backbones(FoveatedConfig(dino="packaged", llm="packaged")).eval()


def test_text_only_question_is_the_plain_llm(real_model):
    # with no frames the foveated model is exactly its LLM: the real SmolLM2 knows this one
    assert "Paris" in ask(real_model, None, "What is the capital of France?", max_new_tokens=16)


def test_image_and_video_files_run_end_to_end(real_model, tmp_path):
    (tmp_path / "red.jpg").write_bytes(jpeg((200, 30, 30), (64, 48)))
    (tmp_path / "clip.mp4").write_bytes(mp4(num_frames=6, size=32))
    for media in ("red.jpg", "clip.mp4"):
        for mode in ("coarse_only", "autoregressive"):
            answer = ask(real_model, tmp_path / media, "What do you see?", read=mode, max_new_tokens=4)
            assert isinstance(answer, str)
