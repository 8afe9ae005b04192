"""Beam search on the KV cache: transformers' own beam search gives the same sequences for a plain LLM, a batch
of clips gives each clip what it gets alone, and n-gram blocking holds (tiny random models). The rules against
repeating (repetition penalty, n-gram blocking) give transformers' tokens in greedy decoding too, on either KV
cache, and leave the default decode exactly as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from tests.tiny import frames, tiny_connector_model, tiny_model
from vlm.beam import banned, restrain, seen

ENDS = [2, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]  # many end ids: hypotheses finish at various lengths


def ragged(lengths_t, lengths_l, seed=0):
    b, t, n = len(lengths_t), max(lengths_t), max(lengths_l)
    g = torch.Generator().manual_seed(seed)
    fm = torch.arange(t)[None] < torch.tensor(lengths_t)[:, None]
    ids = torch.randint(3, 64, (b, n), generator=g)
    am = (torch.arange(n)[None] < torch.tensor(lengths_l)[:, None]).long()
    return frames(b, t, seed), fm, ids, am


def trim(row: list[int]) -> list[int]:
    """Through the first end id."""
    for i, t in enumerate(row):
        if t in ENDS:
            return row[: i + 1]
    return row


@pytest.mark.parametrize(
    "beams, length_penalty, ngram, penalty",
    [(2, 1.0, 0, 1.0), (3, 1.0, 2, 1.0), (4, 0.6, 0, 1.0), (3, 2.0, 3, 1.0), (3, 1.0, 0, 1.3), (2, 1.0, 3, 1.2)],
)
def test_a_plain_llm_gets_transformers_beam_search_sequences(beams, length_penalty, ngram, penalty):
    model = tiny_model()
    fr, fm, ids, am = ragged([0, 0, 0], [5, 5, 5], seed=beams)
    with torch.no_grad():
        ours = model.generate(model.prepare(fr, fm), ids, am, 10, ENDS, num_beams=beams, length_penalty=length_penalty,
                              no_repeat_ngram_size=ngram, repetition_penalty=penalty, mode="coarse_fine")  # fmt: skip
        theirs = model.llm.generate(input_ids=ids, attention_mask=am, num_beams=beams, max_new_tokens=10,
                                    eos_token_id=ENDS, pad_token_id=ENDS[0], do_sample=False, early_stopping=False,
                                    length_penalty=length_penalty, no_repeat_ngram_size=ngram,
                                    repetition_penalty=penalty)  # fmt: skip
    for i in range(len(ids)):
        assert trim(ours[i].tolist()) == trim(theirs[i, ids.shape[1] :].tolist()), i


def greedy(model, ids, am, new=20, cache="dynamic", **restraints):
    """Our greedy decode of prompts without frames (the foveated model is then its plain LLM), end id 2 only."""
    fr, fm = ragged([0] * len(ids), [1] * len(ids))[:2]
    with torch.no_grad():
        return model.generate(model.prepare(fr, fm), ids, am, new, [2], cache=cache, mode="coarse_fine", **restraints)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("penalty, ngram", [(1.3, 0), (0.7, 0), (1.0, 3), (1.2, 3), (1.2, 2)])
def test_greedy_repetition_rules_write_transformers_tokens(cache, penalty, ngram):
    """Right-padded prompts of 6, 4 and 5 tokens decoded as one batch against transformers' generate on each alone,
    with RepetitionPenaltyLogitsProcessor / NoRepeatNGramLogitsProcessor doing the same job there."""
    model = tiny_model()
    _, _, ids, am = ragged([0, 0, 0], [6, 4, 5], seed=5)
    ours = greedy(model, ids, am, cache=cache, repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    plain = greedy(model, ids, am, cache=cache)
    assert not torch.equal(ours, plain)  # the rules changed what the tiny model writes: the comparison means something
    for i, n in enumerate(am.sum(1).tolist()):
        with torch.no_grad():
            theirs = model.llm.generate(input_ids=ids[i : i + 1, :n], max_new_tokens=20, eos_token_id=2,
                                        pad_token_id=2, do_sample=False, repetition_penalty=penalty,
                                        no_repeat_ngram_size=ngram)  # fmt: skip
        assert trim_at(ours[i].tolist(), 2) == trim_at(theirs[0, n:].tolist(), 2), i


def trim_at(row: list[int], end: int) -> list[int]:
    return row[: row.index(end) + 1] if end in row else row


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_default_greedy_decode_is_untouched_by_the_rules(cache, monkeypatch):
    """Off by default: the same tokens as with both rules named off, and the scores are never even processed."""
    import vlm.decoding

    model = tiny_model()
    _, _, ids, am = ragged([0, 0, 0], [6, 4, 5], seed=5)
    named_off = greedy(model, ids, am, cache=cache, repetition_penalty=1.0, no_repeat_ngram_size=0)
    monkeypatch.setattr(vlm.decoding, "restrain", lambda *a, **k: pytest.fail("the default path processed scores"))
    assert torch.equal(greedy(model, ids, am, cache=cache), named_off)


def test_the_repetition_penalty_follows_ctrl_on_positive_and_negative_scores():
    scores = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    held = seen([[0, 1, 1]], 5)
    assert held.tolist() == [[True, True, False, False, False]]
    out = restrain(scores, [[0, 1, 1]], held, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5]]
    ids = torch.tensor([[0, 1, 1]])
    assert torch.equal(out, RepetitionPenaltyLogitsProcessor(2.0)(ids, scores.clone()))
    blocked = restrain(scores, [[3, 4, 3]], None, no_repeat_ngram_size=2)  # "3 4" would come again
    assert torch.equal(blocked, NoRepeatNGramLogitsProcessor(2)(torch.tensor([[3, 4, 3]]), scores.clone()))
    assert blocked[0, 4] == -float("inf") and scores[0, 4] == 0.5  # the caller's scores are left alone
    assert seen([[0, 70]], 5).tolist() == [[True, False, False, False, False]]  # ids past the head: no score to touch
    with pytest.raises(ValueError, match="repetition_penalty"):
        greedy(tiny_model(), *ragged([0], [3])[2:], repetition_penalty=0.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        greedy(tiny_model(), *ragged([0], [3])[2:], no_repeat_ngram_size=-1)


@pytest.mark.parametrize("kind", ["foveated", "mlp"])
def test_batched_beams_equal_each_clip_alone(kind):
    model = tiny_model() if kind == "foveated" else tiny_connector_model(kind)
    read = {"mode": "autoregressive"} if kind == "foveated" else {}
    fr, fm, ids, am = ragged([3, 1, 0], [4, 6, 2], seed=1)
    with torch.no_grad():
        together = model.generate(model.prepare(fr, fm), ids, am, 8, ENDS, num_beams=3, **read)
        for i, (t, n) in enumerate(zip(fm.sum(1).tolist(), am.sum(1).tolist(), strict=True)):
            visual = model.prepare(fr[i : i + 1, :t], fm[i : i + 1, :t])
            alone = model.generate(visual, ids[i : i + 1, :n], am[i : i + 1, :n], 8, ENDS, num_beams=3, **read)
            assert trim(together[i].tolist()) == trim(alone[0].tolist()), i


def test_no_repeat_ngram_blocks_every_repeat():
    model = tiny_model()
    fr, fm, ids, am = ragged([2], [3], seed=4)
    with torch.no_grad():
        out = model.generate(model.prepare(fr, fm), ids, am, 16, [63], num_beams=2, no_repeat_ngram_size=2)
    seq = ids[0].tolist() + out[0].tolist()
    pairs = list(zip(seq, seq[1:], strict=False))
    assert len(pairs) == len(set(pairs))  # no bigram twice, the prompt's included
    assert banned([[1, 2, 3, 1, 2]], 3) == [{3}] and banned([[1, 2]], 3) == [set()]
    with torch.no_grad():  # greedy blocks them too
        out = model.generate(model.prepare(fr, fm), ids, am, 16, [63], no_repeat_ngram_size=2)
    seq = ids[0].tolist() + out[0].tolist()
    pairs = list(zip(seq, seq[1:], strict=False))
    assert len(pairs) == len(set(pairs))
