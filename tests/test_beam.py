"""Beam search on the KV cache: transformers' own beam search gives the same sequences for a plain LLM, a batch
of clips gives each clip what it gets alone, and n-gram blocking holds (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import frames, tiny_connector_model, tiny_model
from vlm.beam import banned

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


@pytest.mark.parametrize("beams, length_penalty, ngram", [(2, 1.0, 0), (3, 1.0, 2), (4, 0.6, 0), (3, 2.0, 3)])
def test_a_plain_llm_gets_transformers_beam_search_sequences(beams, length_penalty, ngram):
    model = tiny_model()
    fr, fm, ids, am = ragged([0, 0, 0], [5, 5, 5], seed=beams)
    with torch.no_grad():
        ours = model.generate(model.prepare(fr, fm), ids, am, 10, ENDS, num_beams=beams, length_penalty=length_penalty,
                              no_repeat_ngram_size=ngram, mode="coarse_fine")  # fmt: skip
        theirs = model.llm.generate(input_ids=ids, attention_mask=am, num_beams=beams, max_new_tokens=10,
                                    eos_token_id=ENDS, pad_token_id=ENDS[0], do_sample=False, early_stopping=False,
                                    length_penalty=length_penalty, no_repeat_ngram_size=ngram)  # fmt: skip
    for i in range(len(ids)):
        assert trim(ours[i].tolist()) == trim(theirs[i, ids.shape[1] :].tolist()), i


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
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(model.prepare(fr, fm), ids, am, 4, [63], no_repeat_ngram_size=2)
