"""Numerical equivalences of the foveated model on tiny random backbones (fp32)."""

from __future__ import annotations

import pytest
import torch

from model import MODES, FoveatedVLM
from tests.tiny import IMAGE, frames, tiny_model


@pytest.fixture(autouse=True, scope="module")
def no_grad():
    """Inference only, for this module's tests: a module-level set_grad_enabled(False) would run at collection
    and switch gradients off for every test file in the session (the training tests among them)."""
    with torch.no_grad():
        yield


def reference_query_output(model: FoveatedVLM, pixels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """A plain Dinov2 layer stack over [CLS, patches, queries] with a mask that keeps the patches from
    attending to the queries and each query from attending to itself or to the other queries."""
    enc, dino = model.encoder, model.encoder.dino
    h = torch.cat([dino.embeddings(pixels), enc.query_in(queries)], dim=1)  # (N, 1+P+k, D)
    s, k = h.shape[1], queries.shape[1]
    allowed = torch.zeros(s, s, dtype=torch.bool)
    allowed[:, : s - k] = True  # everyone sees CLS + patches, nobody sees a query
    mask = torch.zeros(s, s).masked_fill(~allowed, float("-inf"))[None, None]
    for layer in dino.encoder.layer:
        h = layer(h, attention_mask=mask)
    return enc.query_out(dino.layernorm(h[:, -k:]))


@pytest.mark.parametrize("k", [1, 3])
def test_query_attend_equals_masked_dinov2_forward(k):
    model = tiny_model()
    pixels = frames(2, 1)[:, 0]
    queries = torch.randn(2, k, model.config.query_dim)
    cache = model.encoder.encode_patches(pixels)
    out, attn = model.encoder.query_attend(queries, cache)
    ref = reference_query_output(model, pixels, queries)
    assert (out - ref).abs().max() <= 1e-5
    assert cache.features is None  # the deep read takes no final features, so the last layer is not run for them
    assert attn.shape == (2, k, 1 + (IMAGE // 4) ** 2)
    assert torch.allclose(attn.sum(-1), torch.ones(2, k))


def test_shallow_mode_is_one_cross_attention():
    model = tiny_model(deep=False)
    pixels = frames(2, 1)[:, 0]
    q = torch.randn(2, 1, model.config.query_dim)
    cache = model.encoder.encode_patches(pixels)
    out, attn = model.encoder.query_attend(q, cache)
    assert torch.allclose(cache.features, model.encoder.dino(pixels).last_hidden_state, atol=1e-5)  # the backbone's
    h = model.encoder.query_in(q)
    w = torch.softmax(h @ cache.features.transpose(1, 2) / 32**0.5, -1)
    assert torch.allclose(out, model.encoder.query_out(w @ cache.features), atol=1e-6)
    assert torch.allclose(attn, w)


def test_cls_start_reads_the_cls_token():
    """query_start=cls: at init the static read is DINOv2's own CLS token, frame by frame (query_dim = D: exact)."""
    model = tiny_model(query_dim=32, query_start="cls")
    pixels = frames(3, 1)[:, 0]
    cache = model.encoder.encode_patches(pixels)
    out, _ = model.encoder.query_attend(model.q_static.expand(3, 1, 32), cache)
    cls = model.encoder.dino(pixels).last_hidden_state[:, :1]  # (N, 1, D)
    torch.testing.assert_close(out, model.encoder.query_out(cls), rtol=0, atol=1e-5)
    assert torch.equal(model.q_init, model.q_static)
    assert not torch.allclose(tiny_model(query_dim=32).q_static, model.q_static)  # the published start is random


def test_coarse_fine_start_reads_as_the_glance():
    """fine_start=coarse: at init the LLM-written queries are the static one, so every mode reads the same tokens."""
    model = tiny_model(fine_start="coarse")
    fr, fm, _, _ = batch([3, 2], [4, 4])
    visual = model.prepare(fr, fm)
    coarse, a_coarse = model.visual_tokens(visual, mode="coarse_only")
    fine, a_fine = model.visual_tokens(visual, mode="coarse_fine")
    torch.testing.assert_close(fine, coarse, rtol=0, atol=1e-6)
    torch.testing.assert_close(a_fine, a_coarse, rtol=0, atol=1e-6)


def batch(lengths_t, lengths_l, seed=0, vocab=64):
    """Right-padded batch with T_b frames and L_b text tokens per sample."""
    b, t, n = len(lengths_t), max(lengths_t), max(lengths_l)
    g = torch.Generator().manual_seed(seed)
    fr = frames(b, t, seed)
    fm = torch.arange(t)[None] < torch.tensor(lengths_t)[:, None]
    fr[~fm] = 7.0  # junk in padded frames must not matter
    ids = torch.randint(3, vocab, (b, n), generator=g)
    am = (torch.arange(n)[None] < torch.tensor(lengths_l)[:, None]).long()
    ids[am == 0] = 2
    return fr, fm, ids, am


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2])
def test_padded_batch_equals_each_sample_alone(mode, k):
    model = tiny_model(glimpses=k)
    ts, ls = [3, 1, 0], [4, 6, 2]
    fr, fm, ids, am = batch(ts, ls)
    logits = model(fr, fm, ids, am, mode=mode).logits
    for i, (t, n) in enumerate(zip(ts, ls, strict=True)):
        alone = model(fr[i : i + 1, :t], fm[i : i + 1, :t], ids[i : i + 1, :n], am[i : i + 1, :n], mode=mode).logits
        assert (logits[i, :n] - alone[0]).abs().max() <= 1e-5 * max(1.0, alone.abs().max().item()), (mode, i)


def test_autoregressive_equals_coarse_fine_for_one_frame():
    model = tiny_model(glimpses=2)
    fr, fm, ids, am = batch([1, 1], [5, 3])
    ar = model(fr, fm, ids, am, mode="autoregressive").logits
    cf = model(fr, fm, ids, am, mode="coarse_fine").logits
    assert (ar - cf).abs().max() <= 1e-5
    # and with more frames the feedback really changes what is read
    fr, fm, ids, am = batch([3, 2], [5, 3])
    ar = model(fr, fm, ids, am, mode="autoregressive").logits
    co = model(fr, fm, ids, am, mode="coarse_only").logits
    assert (ar - co).abs().max() > 1e-3


@pytest.mark.parametrize("k", [1, 2])
def test_as_many_fine_passes_as_frames_read_as_the_autoregressive_loop(k):
    """Pass p's frame t is read with queries from pass p-1's fine tokens of frames < t, so after T passes every
    frame is read as inference reads it; fewer passes differ from the loop."""
    fr, fm, ids, am = batch([3, 2, 0], [5, 3, 4])
    ar = tiny_model(glimpses=k)(fr, fm, ids, am, mode="autoregressive").logits
    keep = am.bool()
    gaps = [
        (tiny_model(glimpses=k, fine_passes=n)(fr, fm, ids, am, mode="coarse_fine").logits - ar)[keep].abs().max()
        for n in (1, 2, 3)
    ]
    assert gaps[2] <= 1e-5 and gaps[1] > 1e-4 and gaps[0] > 1e-4, gaps
    from config import ConfigError, FoveatedConfig

    with pytest.raises(ConfigError, match="'model.fine_passes' must be >= 1, got 0"):
        FoveatedConfig(fine_passes=0)


def test_autoregressive_kv_cache_equals_recompute():
    model = tiny_model(glimpses=2)
    fr, fm, ids, am = batch([4, 2, 0], [3, 5, 4])
    visual = model.prepare(fr, fm)
    cached = model.prefix(visual, ids, am, kv_cache=True, mode="autoregressive")
    fresh = model.prefix(visual, ids, am, kv_cache=False, mode="autoregressive")
    keep = am.bool()
    assert (cached.hidden[keep] - fresh.hidden[keep]).abs().max() <= 1e-5
    assert torch.equal(cached.mask, fresh.mask)


def test_text_only_batch():
    model = tiny_model()
    fr, fm, ids, am = batch([0, 0], [3, 4])
    out = model(fr, fm, ids, am, labels=ids.masked_fill(am == 0, -100))
    assert out.logits.shape == (2, 4, 64) and torch.isfinite(out.loss)


def test_loss_ignores_minus_100_and_gradients_reach_the_query_loop():
    model = tiny_model().train()
    fr, fm, ids, am = batch([3, 2], [5, 4])
    labels = ids.masked_fill(am == 0, -100)
    with torch.enable_grad():
        out = model(fr, fm, ids, am, labels=labels, mode="coarse_fine")
        out.loss.backward()
    for p in (model.q_init, model.q_static, model.llm_to_query.weight, model.encoder.query_in.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.encoder.dino.encoder.layer[0].attention.k_proj.weight.grad.abs().sum() > 0
    # a label of -100 contributes nothing, whatever token sits there
    labels2 = labels.clone()
    labels2[0, 2] = -100
    ids2 = ids.clone()
    ids2[0, 4] = 5  # last token's value changes no prediction
    a = model.eval()(fr, fm, ids, am, labels=labels2).loss
    b = model(fr, fm, ids2, am, labels=labels2.masked_fill(torch.arange(5) == 4, -100)).loss
    c = model(fr, fm, ids, am, labels=labels2.masked_fill(torch.arange(5) == 4, -100)).loss
    assert torch.allclose(b, c) and not torch.allclose(a, c)


def test_generate_batched_equals_single():
    model = tiny_model()
    fr, fm, ids, am = batch([3, 1], [4, 2], seed=3)
    out = model.generate(model.prepare(fr, fm), ids, am, max_new_tokens=6, eos_token_id=[2, 9], mode="coarse_fine")
    for i, (t, n) in enumerate([(3, 4), (1, 2)]):
        alone = model.generate(
            model.prepare(fr[i : i + 1, :t], fm[i : i + 1, :t]),
            ids[i : i + 1, :n],
            am[i : i + 1, :n],
            max_new_tokens=6,
            eos_token_id=[2, 9],
        )
        n = alone.shape[1]
        assert torch.equal(out[i, :n], alone[0])


def test_generate_matches_argmax_of_forward():
    model = tiny_model()
    fr, fm, ids, am = batch([2], [4], seed=5)
    new = model.generate(model.prepare(fr, fm), ids, am, mode="coarse_fine", max_new_tokens=3, eos_token_id=63)
    seq = ids
    for j in range(new.shape[1]):
        logits = model(fr, fm, seq, torch.ones_like(seq), mode="coarse_fine").logits
        assert logits[0, -1].argmax() == new[0, j]
        seq = torch.cat([seq, new[:, j : j + 1]], 1)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model(glimpses=2)
    fr, fm, ids, am = batch([3, 1], [4, 2])
    model.save_pretrained(tmp_path / "m")
    loaded = FoveatedVLM.from_pretrained(tmp_path / "m")
    for mode in MODES:
        assert torch.equal(model(fr, fm, ids, am, mode=mode).logits, loaded(fr, fm, ids, am, mode=mode).logits)
    assert loaded.config == model.config


def test_load_rejects_a_directory_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        FoveatedVLM.from_pretrained(tmp_path)


def test_unknown_mode_is_an_error():
    model = tiny_model()
    fr, fm, ids, am = batch([1], [2])
    with pytest.raises(ValueError, match="unknown forward mode 'fine'"):
        model(fr, fm, ids, am, mode="fine")


def test_text_only_model_is_exactly_its_llm():
    model = tiny_model()
    fr, fm, ids, am = batch([0, 0], [5, 3])
    ours = model(fr, fm, ids, am).logits
    plain = model.llm(input_ids=ids, attention_mask=am).logits
    assert (ours[am.bool()] - plain[am.bool()]).abs().max() <= 1e-5


def user_turn_batch(tokenizer, lengths_t, users, seed=0):
    """Chat prompts (all opening with the template's user turn), right-padded, with T_b frames each."""
    from inputs.tokenization import prompt_ids

    rows = [prompt_ids(tokenizer, u) for u in users]
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), tokenizer.pad_token_id)
    am = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], am[i, : len(r)] = torch.tensor(r), 1
    t = max(lengths_t)
    fm = torch.arange(t)[None] < torch.tensor(lengths_t)[:, None]
    return frames(len(rows), t, seed), fm, ids, am


USERS = ["What is shown?", "Where is the red square, and what is next to it?", "Hi"]


@pytest.mark.parametrize("mode", MODES)
def test_frames_in_the_user_turn_sit_after_the_head(tokenizer, mode):
    """frames_at user_turn: the LLM sees [head, frame tokens, rest of the text]; padded batch == each alone."""
    from inputs.tokenization import user_turn_head

    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn")
    head = user_turn_head(tokenizer)
    assert tokenizer.decode(head).endswith("<|im_start|>user\n") and torch.equal(model.head_ids, torch.tensor(head))
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 0], USERS)
    logits = model(fr, fm, ids, am, mode=mode).logits
    assert logits.shape[:2] == ids.shape
    for i, n in enumerate(am.sum(1).tolist()):
        t = int(fm[i].sum())
        alone = model(fr[i : i + 1, :t], fm[i : i + 1, :t], ids[i : i + 1, :n], am[i : i + 1, :n], mode=mode).logits
        assert (logits[i, :n] - alone[0]).abs().max() <= 1e-5 * max(1.0, alone.abs().max().item()), (mode, i)
    if mode == "coarse_only":  # the same numbers as the LLM run by hand over [head, tokens, rest]
        h, visual = len(head), model.prepare(fr[:1], fm[:1])
        vis, _ = model.visual_tokens(visual, mode=mode)
        n = int(am[0].sum())
        embeds = model.llm.get_input_embeddings()(ids[:1, :n])
        out = model.llm(inputs_embeds=torch.cat([embeds[:, :h], vis, embeds[:, h:]], dim=1)).logits
        reference = torch.cat([out[:, :h], out[:, h + vis.shape[1] :]], dim=1)
        assert (logits[:1, :n] - reference).abs().max() <= 1e-5


def test_frames_in_the_user_turn_kv_cache_and_one_frame(tokenizer):
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn")
    fr, fm, ids, am = user_turn_batch(tokenizer, [4, 2, 0], USERS)
    visual = model.prepare(fr, fm)
    cached = model.prefix(visual, ids, am, kv_cache=True, mode="autoregressive")
    fresh = model.prefix(visual, ids, am, kv_cache=False, mode="autoregressive")
    keep = am.bool()
    assert (cached.hidden[keep] - fresh.hidden[keep]).abs().max() <= 1e-5 and torch.equal(cached.mask, fresh.mask)
    fr, fm, ids, am = user_turn_batch(tokenizer, [1, 1], USERS[:2])
    ar = model(fr, fm, ids, am, mode="autoregressive").logits
    assert (ar - model(fr, fm, ids, am, mode="coarse_fine").logits).abs().max() <= 1e-5


def test_frames_in_the_user_turn_reject_text_without_the_template(tokenizer):
    model = tiny_model(tokenizer=tokenizer, frames_at="user_turn")
    ids = torch.tensor([tokenizer("no template here", add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match="frames_at is 'user_turn'"):
        model(frames(1, 1), torch.ones(1, 1, dtype=torch.bool), ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        tiny_model(frames_at="user_turn")


def _loss_and_grads(model, batch, mode):
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = model(*batch, mode=mode).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
def test_activation_checkpointing_changes_no_loss_and_no_gradient(mode):
    """transformers' checkpointed layers drop the KV cache in training; the autoregressive loop writes through a
    replay-safe cache instead, so with checkpointing the text still reads the frames."""
    fr, fm, ids, am = batch([3, 1, 2], [5, 4, 6])
    labels = ids.masked_fill(am == 0, -100)
    plain = tiny_model(glimpses=2).train()
    checkpointed = tiny_model(glimpses=2).train()
    checkpointed.checkpoint_activations()
    loss, grads = _loss_and_grads(plain, (fr, fm, ids, am, labels), mode)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, (fr, fm, ids, am, labels), mode)
    assert (loss - loss_ckpt).abs() <= 1e-5
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name, g in grads.items():
        assert (g - grads_ckpt[name]).abs().max() <= 1e-5 * max(1.0, g.abs().max().item()), name
    # the frames reach the loss: other pixels, another loss
    other, _ = _loss_and_grads(checkpointed, (fr + 1.0, fm, ids, am, labels), mode)
    assert (other - loss_ckpt).abs() > 1e-4


@pytest.mark.parametrize("frames_at", ["start", "user_turn"])
@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
def test_loss_predicts_each_token_from_the_slot_before_it(tokenizer, frames_at, mode):
    """The loss equals a plain LLM loss over the sequence the LLM read, [head, frame slots, rest], with the
    slots' labels ignored: the first token after the frames is predicted by the last frame slot."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at=frames_at)
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 0], USERS)
    labels = ids.masked_fill(am == 0, -100)  # stage 1: every text token
    out = model(fr, fm, ids, am, labels=labels, mode=mode)
    h = len(model.head_ids)
    for i, (t, n) in enumerate(zip(fm.sum(1).tolist(), am.sum(1).tolist(), strict=True)):
        lead = model.lead(model.layout(ids[i : i + 1, :n], am[i : i + 1, :n]))  # the head: pass 1 reads after it
        vis, _ = model.visual_tokens(model.prepare(fr[i : i + 1, :t], fm[i : i + 1, :t]), lead, mode=mode)
        embeds = model.llm.get_input_embeddings()(ids[i : i + 1, :n])
        seq = torch.cat([embeds[:, :h], vis, embeds[:, h:]], dim=1)
        full = torch.cat([labels[i : i + 1, :h], torch.full((1, vis.shape[1]), -100), labels[i : i + 1, h:n]], dim=1)
        logits = model.llm(inputs_embeds=seq).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], full[0, 1:], ignore_index=-100, reduction="sum")
        assert out.count[i] == (full[0, 1:] != -100).sum()
        assert (out.nll[i] - nll).abs() <= 1e-4, (i, out.nll[i], nll)


@pytest.mark.parametrize("mode", MODES)
def test_rows_share_one_clip_as_if_each_had_its_own(mode):
    """Two text rows over one clip (DPO's chosen and rejected) give the numbers of two clips repeated, with one
    DINO pass per clip. In float64, so that only a real difference (not fp32's summation order) shows."""
    model = tiny_model(glimpses=2).train().double()
    fr, fm, ids, am = batch([3, 1], [5, 4])
    fr = fr.double()
    ids2, am2 = torch.cat([ids, ids.flip(1)]), torch.cat([am, am])
    labels = ids2.masked_fill(am2 == 0, -100)
    encoded = []
    model.encoder.dino.embeddings.register_forward_hook(lambda m, args, out: encoded.append(out.shape[0]))
    with torch.enable_grad():
        shared = model(fr, fm, ids2, am2, labels, mode=mode, rows=torch.tensor([0, 1, 0, 1]))
        shared.nll.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert encoded == [4]  # 3 + 1 real frames, once
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        repeated = model(fr.repeat(2, 1, 1, 1, 1), fm.repeat(2, 1), ids2, am2, labels, mode=mode)
        repeated.nll.sum().backward()
    assert (shared.nll - repeated.nll).abs().max() <= 1e-6
    assert (shared.logits - repeated.logits).abs().max() <= 1e-6
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert (grads[name] - p.grad).abs().max() <= 1e-6 * max(1.0, p.grad.abs().max().item()), name


@pytest.mark.parametrize("mode", ["coarse_fine", "autoregressive"])
def test_coarse_weight_adds_the_coarse_reads_loss_and_gradient(tokenizer, mode):
    """Training loss = fine + λ·coarse, gradients included, and none in evaluation. In coarse_fine the coarse
    read's LLM pass is pass 1 as well: one LLM pass fewer than the two reads run apart. In float64."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn").train().double()
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 2], USERS)
    fr, labels = fr.double(), ids.masked_fill(am == 0, -100)
    passes = []  # LLM passes over the batch's rows (the head runs apart, for one row: VLM.open_head)
    model.decoder().register_forward_hook(
        lambda module, args, kwargs, out: passes.append(1) if len(kwargs["inputs_embeds"]) == len(fr) else None,
        with_kwargs=True,
    )

    def run(weight: float, read: str):
        model.config.coarse_weight = weight
        model.zero_grad(set_to_none=True)
        passes.clear()
        with torch.enable_grad():
            loss = model(fr, fm, ids, am, labels, mode=read).loss
            loss.backward()
        return (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            len(passes),
        )

    both, g_both, n_both = run(0.5, mode)
    fine, g_fine, n_fine = run(0.0, mode)
    coarse, g_coarse, n_coarse = run(0.0, "coarse_only")
    assert (both - (fine + 0.5 * coarse)).abs() <= 1e-10 and coarse > 0
    assert g_both.keys() == g_fine.keys() | g_coarse.keys()
    for name, g in g_both.items():
        expected = g_fine.get(name, 0) + 0.5 * g_coarse.get(name, 0)
        assert (g - expected).abs().max() <= 1e-6 * max(1.0, g.abs().max().item()), name
    assert n_both == (n_fine if mode == "coarse_fine" else n_fine + n_coarse) and n_coarse == 1
    model.eval()  # validation measures what training minimises, its terms apart
    model.config.coarse_weight = 0.5
    with torch.no_grad():
        out = model(fr, fm, ids, am, labels, mode=mode)
    assert (out.loss - both).abs() <= 1e-6 and out.terms.keys() == {"fine_loss", "coarse_loss"}
    assert (out.terms["fine_loss"] - fine).abs() <= 1e-6 and (out.terms["coarse_loss"] - coarse).abs() <= 1e-6


def _by_hand(model, fr, fm, ids, am, row: int = 0):
    """Coarse-only logits of one row from the LLM run by hand over [head, tokens, rest] (no shared head)."""
    h, n, t = len(model.head_ids), int(am[row].sum()), int(fm[row].sum())
    vis, _ = model.visual_tokens(model.prepare(fr[row : row + 1, :t], fm[row : row + 1, :t]), mode="coarse_only")
    embeds = model.llm.get_input_embeddings()(ids[row : row + 1, :n])
    out = model.llm(inputs_embeds=torch.cat([embeds[:, :h], vis, embeds[:, h:]], dim=1)).logits
    return torch.cat([out[:, :h], out[:, h + vis.shape[1] :]], dim=1)


def test_the_head_runs_once_for_every_row_and_pass_until_a_weight_changes(tokenizer):
    """frames_at user_turn: the head is run for one row and shared by every row of every pass and call while the
    LLM's weights stay as they are; an in-place change (an optimizer step) makes it run again, and every result
    is what the LLM gives run by hand over the whole sequence."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn", fine_passes=2)
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 2], USERS)
    heads = []  # decoder calls over the head alone
    model.decoder().register_forward_hook(
        lambda module, args, kwargs, out: heads.append(1) if kwargs["inputs_embeds"].shape[1] == len(model.head_ids)
        else None, with_kwargs=True,
    )  # fmt: skip
    for mode in MODES:
        model(fr, fm, ids, am, mode=mode)
    assert len(heads) == 1  # three modes, four LLM passes over the batch in coarse_fine, one head run
    logits = model(fr, fm, ids, am, mode="coarse_only").logits
    assert (logits[:1, : int(am[0].sum())] - _by_hand(model, fr, fm, ids, am)).abs().max() <= 1e-5
    with torch.no_grad():
        model.llm.get_decoder().layers[0].self_attn.k_proj.weight.mul_(1.5)  # in place, as an optimizer steps
    logits = model(fr, fm, ids, am, mode="coarse_only").logits
    assert len(heads) == 2
    assert (logits[:1, : int(am[0].sum())] - _by_hand(model, fr, fm, ids, am)).abs().max() <= 1e-5


def test_a_trainable_llm_gets_the_heads_gradient_from_every_row(tokenizer):
    """With the LLM training, the head's one-row run carries the gradient of every row that reads it: the LLM's
    gradients equal those of the LLM run by hand over each whole sequence (float64, but for the LLM's RMSNorm, which
    computes in float32: the sums over rows are taken in another order, ~3e-7 apart)."""
    model = tiny_model(glimpses=1, tokenizer=tokenizer, frames_at="user_turn").double().train()
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 2], USERS)
    fr = fr.double()
    with torch.enable_grad():
        out = model(fr, fm, ids, am, mode="coarse_only").logits
        out[am.bool()].square().sum().backward()
        ours = {n: p.grad.clone() for n, p in model.llm.named_parameters()}
        model.zero_grad(set_to_none=True)
        total = sum(_by_hand(model, fr, fm, ids, am, i)[0].square().sum() for i in range(len(ids)))
        total.backward()
    for name, p in model.llm.named_parameters():
        assert (ours[name] - p.grad).abs().max() <= 2e-6 * p.grad.abs().max().item(), name


@pytest.mark.parametrize("mode", MODES)
def test_a_loss_without_logits_runs_only_through_the_last_label_and_equals_the_full_one(tokenizer, mode):
    """Training's loss (logits=False) cuts the columns after the last labelled one (a stage-2 row's end of turn, a
    short row's padding): the same loss and gradients as the whole sequence, with the LLM run on fewer columns."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn", coarse_weight=0.5).double().train()
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 2], USERS)
    fr, labels = fr.double(), torch.full_like(ids, -100)
    for i, n in enumerate(am.sum(1).tolist()):
        labels[i, n - 4 : n - 2] = ids[i, n - 4 : n - 2]  # two tokens before the row's last two
    widths = []
    model.decoder().register_forward_hook(
        lambda module, args, kwargs, out: widths.append(kwargs["inputs_embeds"].shape[1])
        if len(kwargs["inputs_embeds"]) == len(fr) else None, with_kwargs=True,
    )  # fmt: skip

    def run(logits: bool):
        model.zero_grad(set_to_none=True)
        widths.clear()
        with torch.enable_grad():
            loss = model(fr, fm, ids, am, labels, logits=logits, mode=mode).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, sum(widths)

    full, g_full, wide = run(True)
    cut, g_cut, narrow = run(False)
    assert (full - cut).abs() <= 1e-12 and g_full.keys() == g_cut.keys()
    for name, g in g_full.items():
        assert (g - g_cut[name]).abs().max() <= 1e-10 * max(1.0, g.abs().max().item()), name
    assert narrow < wide  # the last two columns were not run (in each pass over the text that had logits)


def test_two_models_with_one_frozen_dino_share_a_patch_pass_only_for_equal_frames_and_weights():
    """share_frozen: the second model's patch pass of frames the first just encoded is the first's (the same
    tensors), equal to its own; other frames, a changed weight or a backbone that trains get a pass of their own."""
    a, b = tiny_model(), tiny_model()
    assert not a.share_frozen(b)  # DINOv2 still trains in both
    for m in (a, b):
        m.encoder.dino.requires_grad_(False)
    assert not a.share_frozen(tiny_model(seed=1).requires_grad_(False))  # another backbone
    own = b.encoder.encode_patches(frames(3, 1)[:, 0])  # before sharing: b's own DINOv2
    assert a.share_frozen(b, batches=2) and b.encoder.dino is a.encoder.dino
    x, y, z = frames(3, 1)[:, 0], frames(3, 1, seed=1)[:, 0], frames(3, 1, seed=2)[:, 0]
    first, second = a.encoder.encode_patches(x), a.encoder.encode_patches(y)  # two micro-batches
    assert b.encoder.encode_patches(x.clone()) is first and b.encoder.encode_patches(y.clone()) is second
    assert all(torch.equal(k, j) for k, j in zip(first.keys + first.values, own.keys + own.values, strict=True))
    assert b.encoder.encode_patches(z) is not first  # frames never seen: a pass of its own
    a.encoder.encode_patches(x)
    with torch.no_grad():
        a.encoder.dino.embeddings.patch_embeddings.projection.weight.mul_(1.5)  # a new version of a weight
    again = b.encoder.encode_patches(x)
    assert again is not first and not torch.equal(again.keys[0], first.keys[0])
    a.encoder.dino.requires_grad_(True)
    with torch.enable_grad():  # a gradient could reach DINOv2: nothing is kept or reused
        assert b.encoder.encode_patches(x) is not b.encoder.encode_patches(x)
