"""frames_at after_question: the frames follow each row's question, and the foveated model's first fine query is
written from the LLM's hidden state at the question's last word. Everything the base promises holds in it."""

from __future__ import annotations

import pytest
import torch

import registry
from config import MODES
from inputs.tokenization import chat_ids, prompt_ids
from tests.test_model import user_turn_batch
from tests.tiny import frames, tiny_connector_model, tiny_model

QUESTIONS = ["What colour is the triangle?", "What shape is the red one? Answer with one word, please.", "Hi"]
TOL = 1e-5


def qf_model(tokenizer, **options):
    return tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="after_question", **options)


def prompts(tokenizer, lengths_t, questions, seed=0):
    """Chat prompts, right-padded as every caller pads them, with T_b frames each (test_model's batch)."""
    return user_turn_batch(tokenizer, lengths_t, questions, seed)


def split_of(tokenizer, ids_row) -> int:
    """The column of the first user turn's end of turn after the head: the frames go right before it."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [i for i, t in enumerate(ids_row.tolist()) if t == end][1]  # the system message's is the first


def close(a, b, tol=TOL):
    return (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("mode", MODES)
def test_padded_batch_equals_each_alone_and_the_llm_by_hand(tokenizer, mode):
    model = qf_model(tokenizer)
    fr, fm, ids, am = prompts(tokenizer, [3, 1, 0], QUESTIONS)
    out = model(fr, fm, ids, am, mode=mode)
    assert out.logits.shape[:2] == ids.shape
    for i, n in enumerate(am.sum(1).tolist()):
        t = int(fm[i].sum())
        alone = model(fr[i : i + 1, :t], fm[i : i + 1, :t], ids[i : i + 1, :n], am[i : i + 1, :n], mode=mode)
        assert close(out.logits[i, :n], alone.logits[0]), (mode, i)
        if mode != "autoregressive":  # the LLM run by hand over [question, frame tokens, rest]
            s = split_of(tokenizer, ids[i, :n])
            lead = model.lead(model.layout(ids[i : i + 1, :n], am[i : i + 1, :n]))
            assert lead.guided and close(lead.hidden, model.llm.model(input_ids=ids[i : i + 1, :s]).last_hidden_state)
            vis, _ = model.visual_tokens(model.prepare(fr[i : i + 1, :t], fm[i : i + 1, :t]), lead, mode=mode)
            embeds = model.llm.get_input_embeddings()(ids[i : i + 1, :n])
            logits = model.llm(inputs_embeds=torch.cat([embeds[:, :s], vis, embeds[:, s:]], dim=1)).logits
            assert close(out.logits[i, :n], torch.cat([logits[0, :s], logits[0, s + vis.shape[1] :]])), (mode, i)


def test_the_first_read_is_written_from_the_question(tokenizer):
    """One clip, two questions: the question-guided reads look differently, the static one alike; with the frames
    before the question every read is blind to it."""
    fr, fm, ids, am = prompts(tokenizer, [2, 2], QUESTIONS[:2])
    fr[1] = fr[0]
    for frames_at, guided in (("after_question", True), ("user_turn", False)):
        model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at=frames_at)
        for mode in MODES:
            attention = model(fr, fm, ids, am, mode=mode).attention  # (B, T, k, 1+P)
            same = close(attention[0], attention[1], 1e-6)
            assert same == (mode == "coarse_only" or not guided), (frames_at, mode)
    model = qf_model(tokenizer)
    expected = model.llm_to_query(model.llm.model(input_ids=ids[:1, : split_of(tokenizer, ids[0])]).last_hidden_state)
    lead = model.lead(model.layout(ids[:1], am[:1]))
    assert close(model._first_queries(lead, 1).flatten(), expected[0, -1])


def test_autoregressive_equals_coarse_fine_on_one_frame_and_the_cache_recomputation(tokenizer):
    model = qf_model(tokenizer)
    fr, fm, ids, am = prompts(tokenizer, [1, 1, 0], QUESTIONS)
    ar = model(fr, fm, ids, am, mode="autoregressive").logits
    assert close(ar, model(fr, fm, ids, am, mode="coarse_fine").logits)
    fr, fm, ids, am = prompts(tokenizer, [4, 2, 0], QUESTIONS)
    visual = model.prepare(fr, fm)
    cached = model.prefix(visual, ids, am, kv_cache=True, mode="autoregressive")
    fresh = model.prefix(visual, ids, am, kv_cache=False, mode="autoregressive")
    keep = am.bool()
    assert close(cached.hidden[keep], fresh.hidden[keep]) and torch.equal(cached.mask, fresh.mask)
    assert torch.equal(cached.cut, torch.tensor([split_of(tokenizer, r) for r in ids]))


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
def test_labels_line_up_with_the_sequence_the_llm_read(tokenizer, mode):
    """Each token is predicted from the slot before it in [question, frame slots, rest]: the question's end of
    turn by the last frame slot."""
    model = qf_model(tokenizer)
    answers = ["red", "a circle", "Hello!"]
    rows = [chat_ids(tokenizer, q, a, stage=1)[0] for q, a in zip(QUESTIONS, answers, strict=True)]
    n = max(map(len, rows))
    ids = torch.full((3, n), 2)
    am = torch.zeros(3, n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], am[i, : len(r)] = torch.tensor(r), 1
    labels = ids.masked_fill(am == 0, -100)
    fr, fm = frames(3, 3), torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    out = model(fr, fm, ids, am, labels=labels, mode=mode, logits=False)
    for i, (t, n) in enumerate(zip(fm.sum(1).tolist(), am.sum(1).tolist(), strict=True)):
        s = split_of(tokenizer, ids[i, :n])
        lead = model.lead(model.layout(ids[i : i + 1, :n], am[i : i + 1, :n]))
        vis, _ = model.visual_tokens(model.prepare(fr[i : i + 1, :t], fm[i : i + 1, :t]), lead, mode=mode)
        embeds = model.llm.get_input_embeddings()(ids[i : i + 1, :n])
        logits = model.llm(inputs_embeds=torch.cat([embeds[:, :s], vis, embeds[:, s:]], dim=1)).logits
        full = torch.cat([labels[i, :s], torch.full((vis.shape[1],), -100), labels[i, s:n]])
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], full[1:], ignore_index=-100, reduction="sum")
        assert out.count[i] == (full[1:] != -100).sum() and (out.nll[i] - nll).abs() <= 1e-4, (i, mode)


def test_generation_beams_and_options_equal_each_question_alone(tokenizer):
    model = qf_model(tokenizer)
    fr, fm, ids, am = prompts(tokenizer, [3, 2, 0], QUESTIONS)
    visual = model.prepare(fr, fm)
    for read in ({"mode": "coarse_fine"}, {"mode": "autoregressive"}):
        for beams, cache in ((1, "dynamic"), (1, "static"), (2, "dynamic")):
            together = model.generate(visual, ids, am, max_new_tokens=4, num_beams=beams, cache=cache, **read)
            for i, n in enumerate(am.sum(1).tolist()):
                t = int(fm[i].sum())
                one = model.prepare(fr[i : i + 1, :t], fm[i : i + 1, :t])
                alone = model.generate(one, ids[i : i + 1, :n], am[i : i + 1, :n], max_new_tokens=4, num_beams=beams,
                                       cache=cache, **read)  # fmt: skip
                assert torch.equal(together[i, : alone.shape[1]], alone[0]), (read, beams, cache, i)
    ps = [prompt_ids(tokenizer, q) for q in QUESTIONS[:2]]
    options = [[[5, 6, 7], [5, 6, 9]], [[11], [12, 13]]]
    both = model.options_nll(model.prepare(fr[:2], fm[:2]), ps, options, options, mode="autoregressive")
    for i in range(2):
        t = int(fm[i].sum())
        alone = model.option_nll(model.prepare(fr[i : i + 1, :t], fm[i : i + 1, :t]), ps[i], options[i], options[i],
                                 mode="autoregressive")  # fmt: skip
        assert close(both[2 * i : 2 * i + 2], alone)


def test_rows_sharing_a_clip_share_its_question(tokenizer):
    """DPO's chosen and rejected rows read their clip once, with the question they share; rows of one clip that
    ask different questions are refused, since a question-guided read is made once per clip."""
    model = qf_model(tokenizer)
    fr, fm, ids, am = prompts(tokenizer, [3, 2, 3, 2], [QUESTIONS[0], QUESTIONS[1]] * 2)
    rows = torch.tensor([0, 1, 0, 1])
    for mode in MODES:
        shared = model(fr[:2], fm[:2], ids, am, rows=rows, mode=mode).logits
        assert close(shared, model(fr[[0, 1, 0, 1]], fm[[0, 1, 0, 1]], ids, am, mode=mode).logits), mode
    with pytest.raises(ValueError, match="same question"):
        model(fr[:2], fm[:2], ids, am, rows=torch.tensor([0, 0, 1, 1]), mode="coarse_fine")


def test_a_row_without_its_question_s_end_is_refused(tokenizer):
    model = qf_model(tokenizer)
    ids = torch.tensor([prompt_ids(tokenizer, "Hi")[:-6]])  # cut before the user turn's end
    with pytest.raises(ValueError, match="after_question.*no end of its first user turn"):
        model(frames(1, 1), torch.ones(1, 1, dtype=torch.bool), ids, torch.ones_like(ids))


def test_training_reaches_the_question_and_saving_keeps_the_layout(tokenizer, tmp_path):
    """The first query's gradient flows through the question's hidden states to the LLM; q_init, unused, gets none;
    a saved model reads the same after registry.load."""
    model = qf_model(tokenizer, coarse_weight=0.5).train()
    rows = [chat_ids(tokenizer, q, "red", stage=2) for q in QUESTIONS[:2]]
    n = max(len(r[0]) for r in rows)
    ids, labels = torch.full((2, n), 2), torch.full((2, n), -100)
    am = torch.zeros(2, n, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], am[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    fr, fm = frames(2, 2), torch.ones(2, 2, dtype=torch.bool)
    out = model(fr, fm, ids, am, labels=labels, mode="coarse_fine", logits=False)
    out.loss.backward()
    assert out.terms.keys() == {"fine_loss", "coarse_loss"}
    assert model.q_init.grad is None and model.llm_to_query.weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = registry.load(tmp_path / "m")
    assert loaded.config.frames_at == "after_question"
    for mode in MODES:
        assert close(loaded(fr, fm, ids, am, mode=mode).logits, model(fr, fm, ids, am, mode=mode).logits)


@pytest.mark.parametrize("kind", ["cls_gate", "mlp"])
def test_tower_kinds_read_after_the_question_too(tokenizer, kind):
    model = tiny_connector_model(kind, tokenizer, frames_at="after_question")
    fr, fm, ids, am = prompts(tokenizer, [2, 1, 0], QUESTIONS)
    with torch.no_grad():
        logits = model(fr, fm, ids, am).logits
        for i, n in enumerate(am.sum(1).tolist()):
            t = int(fm[i].sum())
            alone = model(fr[i : i + 1, :t], fm[i : i + 1, :t], ids[i : i + 1, :n], am[i : i + 1, :n]).logits
            assert close(logits[i, :n], alone[0]), (kind, i)
