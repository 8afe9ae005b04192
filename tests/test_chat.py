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


def test_chat_replies_under_the_rules_against_repeating_and_the_flags_turn_them_off(tokenizer, monkeypatch, capsys):
    """`ask` and the command pass a repetition penalty of 1.2 and 3-gram blocking by default; 1.0 and 0 give the
    plain greedy reply the benchmarks decode (Answerer.generate)."""
    import chat
    from evals.answering import Answerer
    from inputs.frames import Media
    from tests.tiny import tiny_model
    from vlm.base import VLM

    model = tiny_model(tokenizer=tokenizer, frames_at="user_turn")
    answerer = Answerer(model)
    plain = answerer.generate(answerer.prepare(Media("none")), "Hello there?", "autoregressive", 12)
    assert ask(model, None, "Hello there?", max_new_tokens=12, repetition_penalty=1.0, no_repeat_ngram_size=0) == plain
    seen, real = [], VLM.generate
    monkeypatch.setattr(VLM, "generate", lambda self, *a, **k: seen.append(k) or real(self, *a, **k))
    ask(model, None, "Hello there?", max_new_tokens=12)
    assert seen[-1]["repetition_penalty"] == 1.2 and seen[-1]["no_repeat_ngram_size"] == 3
    monkeypatch.setattr(chat.registry, "load", lambda path: model)
    chat.main(["--model", "m", "Hello there?", "--max-new-tokens", "12", "--repetition-penalty", "1.0",
               "--no-repeat-ngram-size", "0"])  # fmt: skip
    assert seen[-1]["repetition_penalty"] == 1.0 and seen[-1]["no_repeat_ngram_size"] == 0
    assert capsys.readouterr().out.strip() == plain
    for flag, value in (("--repetition-penalty", "0"), ("--no-repeat-ngram-size", "-1")):
        with pytest.raises(SystemExit):
            chat.main(["Hi", flag, value])
        assert flag in capsys.readouterr().err
