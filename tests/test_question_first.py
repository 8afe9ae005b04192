"""frames_at after_question: the frames follow each row's question, and the foveated model's first fine query is
written from the LLM's hidden state at the question's last word. Everything the base promises holds in it."""

from __future__ import annotations

import pytest
import torch

import registry
from config import MODES, ConfigError, FoveatedConfig
from evals.results import weights_digest
from inputs.tokenization import chat_ids, prompt_ids
from tests.test_model import user_turn_batch
from tests.tiny import frames, tiny_connector_model, tiny_model
from vlm.running_norm import RunningNorm

QUESTIONS = ["What colour is the triangle?", "What shape is the red one? Answer with one word, please.", "Hi"]
TOL = 1e-5
HEADS = ("shared", "standardised")  # model.question_query


def qf_model(tokenizer, head="shared", **options):
    """The question-first tiny model; with the standardised head, its statistics are those of QUESTIONS' states and
    its weight random, so that the first query depends on the question (trained, it would; new, it is q_init)."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="after_question", question_query=head, **options)
    if head == "standardised":
        ids = [torch.tensor(prompt_ids(tokenizer, q)) for q in QUESTIONS]
        with torch.no_grad():
            states = torch.stack([model.llm.model(input_ids=i[None]).last_hidden_state[0, -1] for i in ids])
            model.question_norm.mean.copy_(states.mean(0))
            model.question_norm.var.copy_(states.var(0) + 0.1)
            model.question_norm.seen.fill_(3)
            model.question_to_query.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return model


def prompts(tokenizer, lengths_t, questions, seed=0):
    """Chat prompts, right-padded as every caller pads them, with T_b frames each (test_model's batch)."""
    return user_turn_batch(tokenizer, lengths_t, questions, seed)


def split_of(tokenizer, ids_row) -> int:
    """The column of the first user turn's end of turn after the head: the frames go right before it."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [i for i, t in enumerate(ids_row.tolist()) if t == end][1]  # the system message's is the first


def close(a, b, tol=TOL):
    return (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_padded_batch_equals_each_alone_and_the_llm_by_hand(tokenizer, mode, head):
    model = qf_model(tokenizer, head)
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
    state = model.llm.model(input_ids=ids[:1, : split_of(tokenizer, ids[0])]).last_hidden_state[0, -1]
    lead = model.lead(model.layout(ids[:1], am[:1]))
    assert close(model._first_queries(lead, 1).flatten(), model.llm_to_query(state))
    # the standardised head: q_init moved by its weight times the state standardised with the kept statistics,
    model = qf_model(tokenizer, "standardised")
    norm = model.question_norm
    var = norm.var + norm.floor * norm.var.mean() + 1e-12
    expected = model.q_init.flatten() + model.question_to_query.weight @ ((state - norm.mean) / var.sqrt())
    assert close(model._first_queries(lead, 1, model._question_move(lead)).flatten(), expected)
    # it steers every frame's read, not frame 0's alone: with llm_to_query writing one query whatever the frame
    # before, frame 1 is still read differently after the two questions
    with torch.no_grad():
        model.llm_to_query.weight.zero_()
    for mode in MODES:
        attention = model(fr, fm, ids, am, mode=mode).attention  # (B, T, k, 1+P)
        for t in range(2):
            assert close(attention[0, t], attention[1, t], 1e-6) == (mode == "coarse_only"), (mode, t)


def test_running_norm_keeps_the_statistics_of_every_batch_and_reads_each_row_alone():
    """Each batch adds to the statistics after it is read: with momentum 0 they are the mean and variance of all
    it has seen (batches of one size weigh alike); a row's result does not depend on the rows beside it, in training
    too; nothing seen gives zeros; evaluation and no_grad leave the statistics alone."""
    torch.manual_seed(0)
    x = torch.randn(120, 5) * torch.tensor([1.0, 3.0, 0.1, 10.0, 1e-3]) + torch.tensor([20.0, -5.0, 0.0, 2.0, 7.0])
    norm = RunningNorm(5, momentum=0.0).train()
    assert torch.equal(norm(x[:8]), torch.zeros(8, 5))  # the first batch: no statistics yet, then its own
    for chunk in x[8:].split(8):
        norm(chunk)
    assert norm.seen == 15
    assert torch.allclose(norm.mean, x.mean(0), rtol=1e-5, atol=1e-4)
    var = x.var(0, unbiased=False)
    assert torch.allclose(norm.var, var, rtol=1e-4)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    standardised = norm.eval()(x[:4])
    with torch.no_grad():
        norm.train()(x[:4])
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())
    floor = var + 0.01 * var.mean()
    assert torch.allclose(standardised, (x[:4] - x.mean(0)) / floor.sqrt(), rtol=1e-3, atol=1e-3)
    rows = torch.cat([alone_copy(norm, x[i : i + 1]) for i in range(6)])
    assert torch.equal(norm(x[:6]), rows) and norm.seen == 16


def alone_copy(norm: RunningNorm, row: torch.Tensor) -> torch.Tensor:
    """One row through a copy of `norm` (its statistics as they are now), in training mode."""
    copy = RunningNorm(norm.mean.shape[0], norm.momentum, norm.floor).train()
    copy.load_state_dict(norm.state_dict())
    return copy(row)


def test_the_standardised_head_is_for_the_question_first_layout():
    with pytest.raises(ConfigError, match="question_query.*frames_at is 'user_turn'.*only frames_at after_question"):
        FoveatedConfig(frames_at="user_turn", question_query="standardised")
    with pytest.raises(ConfigError, match="question_query"):
        FoveatedConfig(frames_at="after_question", question_query="normed")


@pytest.mark.parametrize("head", HEADS)
def test_autoregressive_equals_coarse_fine_on_one_frame_and_the_cache_recomputation(tokenizer, head):
    model = qf_model(tokenizer, head)
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


@pytest.mark.parametrize("head", HEADS)
def test_generation_beams_and_options_equal_each_question_alone(tokenizer, head):
    model = qf_model(tokenizer, head)
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


@pytest.mark.parametrize("head", HEADS)
def test_training_reaches_the_question_and_saving_keeps_the_layout(tokenizer, tmp_path, head):
    """The first query's gradient flows through the question's hidden states to the LLM; q_init, unused by the
    shared head, gets none; the standardised head's statistics take the batch in; a saved model (statistics
    included) reads the same after registry.load."""
    model = qf_model(tokenizer, head, coarse_weight=0.5).train()
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
    assert model.llm_to_query.weight.grad.abs().sum() > 0
    if head == "shared":
        assert model.q_init.grad is None
    else:
        assert model.question_to_query.weight.grad.abs().sum() > 0 and model.q_init.grad.abs().sum() > 0
        assert model.question_norm.seen == 4  # qf_model's 3, and this batch
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = registry.load(tmp_path / "m")
    assert loaded.config.frames_at == "after_question" and loaded.config.question_query == head
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert weights_digest(loaded) == weights_digest(model)  # a result file names the model it read (0-dim buffers too)
    if head == "standardised":
        loaded.question_norm.seen += 1
        assert weights_digest(loaded) != weights_digest(model)
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
