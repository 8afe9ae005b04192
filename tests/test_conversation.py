"""Conversations on a KV cache: the model reads exactly the chat template's rendering of the conversation, a
later turn reuses the clip's encoding and equals recomputing everything, replies stream, and the rules against
repeating see the whole conversation as generate sees its prompt."""

from __future__ import annotations

import pytest
import torch

from cli import UserError
from encoder import FoveatedEncoder
from evals.answering import Answerer
from evals.conversation import Conversation
from inputs.frames import Media
from tests.conftest import jpeg, mp4
from tests.tiny import tiny_connector_model, tiny_model, tiny_smolvlm

QUESTIONS = ["What colour is the ball?", "And what is next to it, in a few words?"]


def models(tokenizer):
    return {
        "foveated start": tiny_model(tokenizer=tokenizer),
        "foveated user_turn": tiny_model(tokenizer=tokenizer, frames_at="user_turn"),
        "mlp": tiny_connector_model("mlp", tokenizer),
        "smolvlm": tiny_smolvlm(tokenizer),
    }


@pytest.fixture(scope="module")
def zoo(tokenizer):
    return models(tokenizer)


@pytest.mark.parametrize("name", ["foveated start", "foveated user_turn", "mlp", "smolvlm"])
def test_the_model_reads_the_templates_rendering_and_a_later_turn_equals_recomputing(zoo, name):
    answerer = Answerer(zoo[name])
    state = answerer.prepare(Media("video", [mp4(6, 32)]))
    conv = Conversation(answerer, state)
    first = list(conv.ask(QUESTIONS[0], max_new_tokens=5))
    assert all(b.startswith(a) for a, b in zip(first, first[1:], strict=False))  # streamed: the reply grows
    before = list(conv.ids)
    second = list(conv.ask(QUESTIONS[1], max_new_tokens=5))[-1]
    processor = answerer.processor
    rendered = processor.render(conv.messages, state.pictures, generation_prompt=False)
    decode = processor.tokenizer.decode

    def read(text: str) -> str:  # a rendering as the model reads it (SmolVLM: each <image> expanded)
        return decode(processor.turn_ids(text, state.pictures, first=True))

    # what the cache holds is the template's rendering of the conversation, up to the last reply
    assert decode(conv.ids) == read(conv.fed) and rendered.startswith(conv.fed)
    rest = rendered[len(conv.fed) :]  # the last reply's end of turn, or the whole reply when the template writes it
    reply = rendered[len(processor.render(conv.messages[:-1], state.pictures)) :]  # otherwise than generated
    assert rest in (processor_end(processor), reply)
    assert decode(conv.asked) == read(processor.render(conv.messages[:-1], state.pictures))
    # the second turn on the cache = a fresh prefix over everything it had read, then greedy
    assert conv.asked[: len(before)] == before
    ids = torch.tensor([conv.asked])
    with torch.inference_mode():
        fresh = answerer.model.generate(state.visual, ids, torch.ones_like(ids), 5, processor.end_ids,
                                        **answerer.reads[conv.read])  # fmt: skip
    assert processor.tokenizer.decode(fresh[0], skip_special_tokens=True) == second


def processor_end(processor) -> str:
    """What the template writes after the last reply, which the cache does not hold yet."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "REPLY"}]
    return processor.render(probe, (), generation_prompt=False).split("REPLY", 1)[1]


def test_later_turns_do_not_encode_the_clip_again(tokenizer, monkeypatch):
    calls = []
    real = FoveatedEncoder.encode_patches
    monkeypatch.setattr(FoveatedEncoder, "encode_patches", lambda self, x: calls.append(len(x)) or real(self, x))
    answerer = Answerer(tiny_model(tokenizer=tokenizer, frames_at="user_turn"))
    conv = Conversation(answerer, answerer.prepare(Media("image", [jpeg((200, 30, 30))])))
    for q in QUESTIONS * 2:
        list(conv.ask(q, max_new_tokens=3))
    assert calls == [2]  # one pass over the image's 2 copies, for four turns
    assert conv.attention is not None and conv.attention.shape[0] == 2  # where each frame was read


def test_an_unknown_read_is_refused(tokenizer):
    answerer = Answerer(tiny_connector_model("cls_gate", tokenizer))
    with pytest.raises(UserError, match="reads in"):
        Conversation(answerer, answerer.prepare(Media("none")), read="autoregressive")


def test_the_rules_against_repeating_see_the_whole_conversation(tokenizer):
    """Each turn under a repetition penalty and n-gram blocking is what generate writes after everything the
    conversation had read, under the same rules; and the rules change what this tiny model says."""
    answerer = Answerer(tiny_model(tokenizer=tokenizer, frames_at="user_turn"))
    state = answerer.prepare(Media("image", [jpeg((200, 30, 30))]))
    rules = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    conv, plain = Conversation(answerer, state), Conversation(answerer, state)
    processor, replies = answerer.processor, []
    for q in QUESTIONS:
        said = list(conv.ask(q, 12, **rules))[-1]
        replies.append(said)
        ids = torch.tensor([conv.asked])
        with torch.inference_mode():
            fresh = answerer.model.generate(state.visual, ids, torch.ones_like(ids), 12, processor.end_ids,
                                            **rules, **answerer.reads[conv.read])  # fmt: skip
        assert processor.tokenizer.decode(fresh[0], skip_special_tokens=True) == said
    assert [list(plain.ask(q, 12))[-1] for q in QUESTIONS] != replies


@pytest.mark.parametrize("read", ["coarse_fine", "autoregressive"])
def test_with_the_frames_after_the_question_each_question_gets_its_own_look(tokenizer, monkeypatch, read):
    """frames_at after_question: DINOv2 runs once per clip; every question is read anew, with queries written after
    it, the frames placed after that question's words in the conversation so far."""
    calls = []
    real = FoveatedEncoder.encode_patches
    monkeypatch.setattr(FoveatedEncoder, "encode_patches", lambda self, x: calls.append(len(x)) or real(self, x))
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="after_question")
    answerer = Answerer(model)
    state = answerer.prepare(Media("video", [mp4(6, 32)]))
    conv = Conversation(answerer, state, read=read)
    replies = [list(conv.ask(q, max_new_tokens=4))[-1] for q in QUESTIONS]
    assert calls == [int(state.visual.frame_mask.sum())]  # one DINOv2 pass, two questions
    assert [q for q, _ in conv.looks] == QUESTIONS
    first, second = (look for _, look in conv.looks)
    assert not torch.allclose(first, second, atol=1e-4)  # the second question looked elsewhere
    end = model.question_end
    ids = torch.tensor([conv.asked])  # everything read before the second reply
    ends = [i for i, t in enumerate(conv.asked) if t == end]
    with torch.inference_mode():

        def look(split: int) -> torch.Tensor:
            pre = model.prefix(state.visual, ids, torch.ones_like(ids), True, None, split=torch.tensor([split]),
                               mode=read)  # fmt: skip
            return pre.attention[0]

        assert torch.allclose(second, look(ends[-1]), atol=1e-6)  # after the latest question
        assert not torch.allclose(second, look(ends[1]), atol=1e-4)  # not where the first question's frames stood
        pre = model.prefix(state.visual, ids, torch.ones_like(ids), True, None, split=torch.tensor([ends[-1]]),
                           mode=read)  # fmt: skip
        said, hidden, mask = [], pre.hidden[:, -1], pre.mask  # greedy on that fresh read: the second reply
        for _ in range(4):
            token = int(model.lm_head(hidden).argmax(-1))
            if token in answerer.processor.end_ids:
                break
            said.append(token)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            hidden = model._llm(model.embed(torch.tensor([[token]])), mask, pre.past)[:, -1]
    assert replies[1] == tokenizer.decode(said, skip_special_tokens=True)
