"""The static (preallocated) KV cache gives what the dynamic one gives: the same prefix states, the same hidden
state at every decode step and the same tokens, greedy and beam search, for a connector model on right-padded
prompts and ragged clips and for the foveated model in every mode (its autoregressive loop writing frame by
frame into the one static cache), clips of T = [3, 1, 0] frames and batches without frames (tiny random
configs, fp32)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from config import MODES
from tests.tiny import frames, tiny_connector_model, tiny_model
from vlm.kvcache import MIN_SLOTS, StaticKV, slots_for

TOL = 1e-5


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


pytestmark = pytest.mark.usefixtures("single_thread")


def batch(ts: list[int], ls: list[int], seed: int = 0, vocab: int = 64):
    """Clips of `ts` frames (junk in the padded ones) and right-padded prompts of `ls` tokens."""
    b, t, n = len(ts), max(ts), max(ls)
    fr = frames(b, t, seed)
    fm = torch.arange(t)[None] < torch.tensor(ts)[:, None]
    fr[~fm] = 7.0
    ids = torch.randint(3, vocab, (len(ls), n), generator=torch.Generator().manual_seed(seed))
    am = (torch.arange(n)[None] < torch.tensor(ls)[:, None]).long()
    return fr, fm, ids, am


def teacher_forced(model, pre, tokens: torch.Tensor) -> torch.Tensor:
    """Feed `tokens` (B, N) one at a time on the prefix's cache, as generate does -> hidden (B, N, D) after each."""
    mask, out = pre.mask, []
    for j in range(tokens.shape[1]):
        mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
        out.append(model._llm(model.embed(tokens[:, j : j + 1]), mask, pre.past)[:, -1])
    return torch.stack(out, dim=1)


def assert_static_equals_dynamic(model, fr, fm, ids, am, new: int = 5, **read):
    """Prefix, every decode step and the generated tokens agree between the two caches."""
    with torch.no_grad():
        visual = model.prepare(fr, fm)
        dyn = model.prefix(visual, ids, am, True, None, **read)
        sta = model.prefix(visual, ids, am, True, None, new, **read)
        assert isinstance(sta.past, StaticKV) and not isinstance(dyn.past, StaticKV)
        assert torch.equal(sta.mask, dyn.mask)
        assert diff(sta.hidden, dyn.hidden) <= TOL
        assert diff(sta.last_visual[dyn.framed], dyn.last_visual[dyn.framed]) <= TOL
        if dyn.attention is not None:
            assert diff(sta.attention, dyn.attention) <= TOL
        forced = torch.randint(3, 64, (len(ids), new - 1), generator=torch.Generator().manual_seed(1))
        steps = teacher_forced(model, dyn, forced), teacher_forced(model, sta, forced)
        assert diff(*steps) <= TOL and diff(model.lm_head(steps[0]), model.lm_head(steps[1])) <= TOL
        for beams in (1, 3):
            kw = dict(max_new_tokens=new, eos_token_id=63, num_beams=beams, **read)
            dynamic = model.generate(visual, ids, am, **kw)
            static = model.generate(visual, ids, am, cache="static", **kw)
            assert dynamic.shape[1] == new and torch.equal(static, dynamic), (beams, static, dynamic)
    return dynamic


def test_connector_model_padded_prompts_ragged_clips():
    model = tiny_connector_model("mlp")
    fr, fm, ids, am = batch([3, 1, 0], [4, 7, 2])
    out = assert_static_equals_dynamic(model, fr, fm, ids, am)
    assert len({tuple(row) for row in out.tolist()}) > 1  # rows are really generated from their own inputs


@pytest.mark.parametrize("mode", MODES)
def test_foveated_every_mode_ragged_and_text_only(mode):
    model = tiny_model(glimpses=2)
    for ts, ls in (([3, 1], [5, 3]), ([3, 1, 0], [2, 6, 4]), ([0, 0], [3, 5])):
        fr, fm, ids, am = batch(ts, ls, seed=len(ts))
        assert_static_equals_dynamic(model, fr, fm, ids, am, mode=mode)
    fr, fm, ids, am = batch([3, 1], [4, 6, 2])  # three text rows about two clips: the cache's batch selected once
    rows = torch.tensor([1, 0, 1])
    with torch.no_grad():
        visual = model.prepare(fr, fm)
        dyn, sta = (model.prefix(visual, ids, am, True, rows, room, mode=mode) for room in (None, 2))
        assert diff(sta.hidden, dyn.hidden) <= TOL
        forced = torch.tensor([[5, 9]] * 3)
        assert diff(teacher_forced(model, sta, forced), teacher_forced(model, dyn, forced)) <= TOL


@pytest.mark.parametrize("mode", ["coarse_fine", "autoregressive"])
def test_foveated_frames_in_the_user_turn(tokenizer, mode):
    """With frames_at user_turn the chat template's head goes before the frames (its own first LLM step)."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn")
    fr, fm, ids, am = batch([3, 1], [5, 3])
    ids = torch.cat([model.head_ids.expand(2, -1), ids], dim=1)
    am = torch.cat([torch.ones_like(ids[:, : len(model.head_ids)]), am], dim=1)
    assert_static_equals_dynamic(model, fr, fm, ids, am, mode=mode)


@pytest.mark.parametrize("kind", ["mlp", "foveated"])
def test_bf16_autocast_same_tokens_and_logits_within_a_bf16_step(kind):
    """Under bf16 autocast (how a GPU reads) a layer's keys come in fp32 or bf16 by the dtype of the LLM's input (the
    rotary embedding follows it) while its values stay bf16: the static cache holds each in its own dtype and gives
    the dynamic cache's greedy tokens in every read; the logits differ by at most 0.125 (four bf16 steps at their
    size, |logit| < 8), as bf16 attention sums over more (masked) slots. Beam search, whose summed scores meet in
    near-ties a bf16 step can tip, is compared exactly in fp32 (the tests above)."""
    model = tiny_connector_model("mlp") if kind == "mlp" else tiny_model(glimpses=2)
    fr, fm, ids, am = batch([3, 1, 0], [4, 7, 2])
    forced = torch.randint(3, 64, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        visual = model.prepare(fr, fm)
        for read in model.reads.values():
            dyn = model.prefix(visual, ids, am, True, None, **read)
            logits = model.lm_head(teacher_forced(model, dyn, forced)).float()
            sta = model.prefix(visual, ids, am, True, None, 5, **read)
            assert sta.past.layers[0].keys.dtype == torch.float32 or read.get("mode") == "autoregressive"
            assert sta.past.layers[0].values.dtype == torch.bfloat16
            assert diff(model.lm_head(teacher_forced(model, sta, forced)).float(), logits) <= 0.125
            assert logits.abs().max() < 8
            kw = dict(max_new_tokens=5, eos_token_id=63, **read)
            dynamic = model.generate(visual, ids, am, **kw)
            assert torch.equal(model.generate(visual, ids, am, cache="static", **kw), dynamic), read


def test_unwritten_slots_are_masked_not_skipped():
    """The buffer is allocated once for prefix + room, the prefix written at its start; `pad` gives every call the
    full-length mask with the unwritten tail masked, and refuses a mask longer than the buffer."""
    model = tiny_connector_model("mlp")
    fr, fm, ids, am = batch([2], [3])
    with torch.no_grad():
        pre = model.prefix(model.prepare(fr, fm), ids, am, True, None, 4)
    layer = pre.past.layers[0]
    assert layer.keys.shape[2] == pre.past.length == slots_for(pre.mask.shape[1] + 4) == MIN_SLOTS
    assert int(layer.cumulative_length) == pre.mask.shape[1]
    padded = pre.past.pad(pre.mask)
    assert padded.shape == (1, pre.past.length) and not padded[:, pre.mask.shape[1] :].any()
    with pytest.raises(ValueError, match="holds"):
        pre.past.pad(torch.ones(1, pre.past.length + 1, dtype=torch.long))


def test_refusals():
    model = tiny_connector_model("mlp")
    fr, fm, ids, am = batch([1], [3])
    visual = model.prepare(fr, fm)
    with pytest.raises(ValueError, match=r"'dynamic', 'static'.*'paged'"):
        model.generate(visual, ids, am, max_new_tokens=2, eos_token_id=63, cache="paged")
    with pytest.raises(ValueError, match="compile needs cache='static'"):
        model.generate(visual, ids, am, max_new_tokens=2, eos_token_id=63, compile=True)
    with pytest.raises(RuntimeError, match="inference"):  # with gradients on: training keeps the dynamic cache
        model.prefix(visual, ids, am, True, None, 2)


def test_smolvlm(tokenizer):
    """SmolVLM's own layout (image features in place of its `<image>` tokens) on the static cache."""
    from PIL import Image

    from inputs.processors import processor_for
    from tests.tiny import tiny_smolvlm

    model = tiny_smolvlm(tokenizer)
    processor = processor_for(model)
    image = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    ids = torch.tensor([processor.prompt("What is this?", [image])])
    visual = processor.visual([image])
    assert_static_equals_dynamic(model, visual["pixel_values"], visual["pixel_attention_mask"], ids,
                                 torch.ones_like(ids))  # fmt: skip


def test_compiled_decode_step():
    """torch.compile'd decode steps on the static cache (inductor here, CUDA graphs on a GPU) give the eager tokens;
    compiling takes 10-70 s on this CPU, once per batch size and cache bucket: a second call with other prompt
    lengths in the same bucket runs on the same kept cache and compiles nothing."""
    model = tiny_connector_model("mlp")
    kw = dict(max_new_tokens=6, eos_token_id=63)  # greedy: beam search compiles once more (batch B*K)
    graphs = None
    for ts, ls in (([3, 1, 0], [4, 7, 2]), ([1, 2, 2], [9, 3, 5])):
        fr, fm, ids, am = batch(ts, ls, seed=len(ls) + ls[0])
        with torch.no_grad():
            visual = model.prepare(fr, fm)
            compiled = model.generate(visual, ids, am, cache="static", compile=True, **kw)
            assert torch.equal(compiled, model.generate(visual, ids, am, **kw))
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs > 0


def kept_caches(model):
    """Every StaticKV the model's decoder is handed, with its layers' buffer addresses as written, per call."""
    seen = []

    def hook(module, args, kwargs):
        past = kwargs.get("past_key_values")
        if isinstance(past, StaticKV):
            seen.append(past)

    handle = model.decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def addresses(cache: StaticKV) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]


@pytest.mark.parametrize("kind", ["mlp", "foveated"])
def test_a_second_generate_reuses_the_first_static_cache(kind):
    """Calls with the same batch shape and length bucket run on one cache object with the same buffers (reset, not
    reallocated) and give the dynamic cache's tokens each time; another batch shape gets buffers of its own, and
    the first shape's come back after it; beams (B*K rows) keep theirs too; a longer call takes another bucket."""
    model = tiny_connector_model("mlp") if kind == "mlp" else tiny_model(glimpses=2)
    read = {} if kind == "mlp" else {"mode": "autoregressive"}
    seen, handle = kept_caches(model)
    calls = {}  # name -> (cache object, buffer addresses after the call)
    try:
        for name, ts, ls, kw in (
            ("first", [3, 1, 0], [4, 7, 2], {}),
            ("second", [1, 3, 2], [6, 2, 5], {}),  # other clips and prompt lengths, the same bucket
            ("pair", [2, 1], [3, 5], {}),  # another batch shape
            ("third", [2, 2, 1], [5, 5, 3], {}),  # the first shape again
            ("beams", [3, 1, 0], [4, 7, 2], {"num_beams": 3}),
            ("beams again", [1, 1, 2], [2, 3, 4], {"num_beams": 3}),
            ("long", [3, 1, 0], [4, 7, 2], {"max_new_tokens": MIN_SLOTS}),  # past the first bucket
        ):
            fr, fm, ids, am = batch(ts, ls, seed=len(calls))
            kw = {"max_new_tokens": 5, "eos_token_id": 63, **kw, **read}
            with torch.no_grad():
                visual = model.prepare(fr, fm)
                start = len(seen)
                static = model.generate(visual, ids, am, cache="static", **kw)
                assert torch.equal(static, model.generate(visual, ids, am, **kw)), name
            assert len({id(c) for c in seen[start:]}) == 1  # one cache for the whole call
            calls[name] = seen[start], addresses(seen[start])
    finally:
        handle.remove()
    first, second = calls["first"], calls["second"]
    assert second[0] is first[0] and second[1] == first[1]
    assert calls["pair"][0] is first[0] and not set(calls["pair"][1]) & set(first[1])
    assert calls["third"][0] is first[0] and calls["third"][1] == first[1]
    assert calls["beams again"][1] == calls["beams"][1] and not set(calls["beams"][1]) & set(first[1])
    assert calls["long"][0] is not first[0] and calls["long"][0].length == 2 * MIN_SLOTS == 2 * first[0].length


def test_kept_cache_made_under_inference_mode_serves_no_grad_and_is_emptied():
    """A cache first filled under torch.inference_mode (bench.py) is written again under no_grad (generate's own),
    and a claim hands it back empty: every buffer zero, nothing written."""
    model = tiny_connector_model("mlp")
    fr, fm, ids, am = batch([3, 1], [4, 6])
    kw = dict(max_new_tokens=4, eos_token_id=63)
    with torch.inference_mode():
        visual = model.prepare(fr, fm)
        first = model.generate(visual, ids, am, cache="static", **kw)
    with torch.no_grad():
        visual = model.prepare(fr, fm)
        assert torch.equal(model.generate(visual, ids, am, cache="static", **kw), first)
        assert torch.equal(model.generate(visual, ids, am, **kw), first)
    cache = StaticKV.claim(model.decoder(), 10)
    assert not any(layer.is_initialized for layer in cache.layers)
    for layer in cache.layers:
        for keys, values, written in layer.kept.values():
            assert not keys.is_inference() and int(written) > 0 and keys.any() and values.any()
    with torch.no_grad():
        pre = model.prefix(visual, ids, am, True, None, 4)
    assert pre.past is cache
    for layer in cache.layers:
        n = int(layer.cumulative_length)
        assert n == pre.mask.shape[1] and not layer.keys[:, :, n:].any() and not layer.values[:, :, n:].any()


def test_slots_bucket_lengths():
    assert [slots_for(n) for n in (1, 63, 64, 65, 128, 129, 1000)] == [64, 64, 64, 128, 128, 256, 1024]
