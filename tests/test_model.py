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
    # the patch side is the unchanged backbone
    assert torch.allclose(cache.features, model.encoder.dino(pixels).last_hidden_state, atol=1e-5)
    assert attn.shape == (2, k, 1 + (IMAGE // 4) ** 2)
    assert torch.allclose(attn.sum(-1), torch.ones(2, k))


def test_shallow_mode_is_one_cross_attention():
    model = tiny_model(deep=False)
    pixels = frames(2, 1)[:, 0]
    q = torch.randn(2, 1, model.config.query_dim)
    cache = model.encoder.encode_patches(pixels)
    out, attn = model.encoder.query_attend(q, cache)
    h = model.encoder.query_in(q)
    w = torch.softmax(h @ cache.features.transpose(1, 2) / 32**0.5, -1)
    assert torch.allclose(out, model.encoder.query_out(w @ cache.features), atol=1e-6)
    assert torch.allclose(attn, w)


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
        assert (logits[i, :n] - alone[0]).abs().max() <= 1e-5, (mode, i)


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


def test_autoregressive_kv_cache_equals_recompute():
    model = tiny_model(glimpses=2)
    fr, fm, ids, am = batch([4, 2, 0], [3, 5, 4])
    cache = model.encode(fr, fm)
    cached = model.prefix(cache, fm, ids, am, "autoregressive", kv_cache=True)
    fresh = model.prefix(cache, fm, ids, am, "autoregressive", kv_cache=False)
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
    out = model.generate(fr, fm, ids, am, max_new_tokens=6, eos_token_id=[2, 9])
    for i, (t, n) in enumerate([(3, 4), (1, 2)]):
        alone = model.generate(
            fr[i : i + 1, :t],
            fm[i : i + 1, :t],
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
    new = model.generate(fr, fm, ids, am, mode="coarse_fine", max_new_tokens=3, eos_token_id=63)
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
    from tokenization import prompt_ids

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
    from tokenization import user_turn_head

    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn")
    head = user_turn_head(tokenizer)
    assert tokenizer.decode(head).endswith("<|im_start|>user\n") and torch.equal(model.head_ids, torch.tensor(head))
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 0], USERS)
    logits = model(fr, fm, ids, am, mode=mode).logits
    assert logits.shape[:2] == ids.shape
    for i, n in enumerate(am.sum(1).tolist()):
        t = int(fm[i].sum())
        alone = model(fr[i : i + 1, :t], fm[i : i + 1, :t], ids[i : i + 1, :n], am[i : i + 1, :n], mode=mode).logits
        assert (logits[i, :n] - alone[0]).abs().max() <= 1e-5, (mode, i)
    if mode == "coarse_only":  # the same numbers as the LLM run by hand over [head, tokens, rest]
        h, cache = len(head), model.encode(fr[:1], fm[:1])
        vis, _ = model.visual_tokens(cache, fm[:1], mode, head=None)
        n = int(am[0].sum())
        embeds = model.llm.get_input_embeddings()(ids[:1, :n])
        out = model.llm(inputs_embeds=torch.cat([embeds[:, :h], vis, embeds[:, h:]], dim=1)).logits
        reference = torch.cat([out[:, :h], out[:, h + vis.shape[1] :]], dim=1)
        assert (logits[:1, :n] - reference).abs().max() <= 1e-5


def test_frames_in_the_user_turn_kv_cache_and_one_frame(tokenizer):
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn")
    fr, fm, ids, am = user_turn_batch(tokenizer, [4, 2, 0], USERS)
    cache = model.encode(fr, fm)
    cached = model.prefix(cache, fm, ids, am, "autoregressive", kv_cache=True)
    fresh = model.prefix(cache, fm, ids, am, "autoregressive", kv_cache=False)
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


def test_token_norm_standardises_real_frames_and_is_per_sample_after_training(tmp_path):
    """token_norm batch: in training the read tokens of the real frames (padding excluded) are standardised per
    feature; after training (running statistics) a padded batch still equals each sample alone, and
    save/load keeps the statistics."""
    model = tiny_model(glimpses=2, token_norm="batch").train()
    fr, fm, ids, am = batch([3, 1, 2], [4, 6, 2])
    seen = []
    model.dino_to_llm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(fr, fm, ids, am, mode="coarse_only")
    x = seen[0].flatten(0, -2)  # (real frames * glimpses, D): 6 frames * 2, padding never read
    assert x.shape[0] == 12
    assert x.mean(0).abs().max() < 1e-5 and (x.var(0, unbiased=False) - 1).abs().max() < 1e-2  # eps
    for _ in range(3):
        model(fr, fm, ids, am, mode="coarse_fine")
    model.eval()
    for mode in MODES:
        logits = model(fr, fm, ids, am, mode=mode).logits
        for i, (t, n) in enumerate(zip([3, 1, 2], [4, 6, 2], strict=True)):
            alone = model(fr[i : i + 1, :t], fm[i : i + 1, :t], ids[i : i + 1, :n], am[i : i + 1, :n], mode=mode)
            assert (logits[i, :n] - alone.logits[0]).abs().max() <= 1e-5, (mode, i)
    model.save_pretrained(tmp_path / "m")
    loaded = FoveatedVLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.token_norm.running_var, model.token_norm.running_var)
    assert torch.equal(loaded(fr, fm, ids, am).logits, model(fr, fm, ids, am).logits)
