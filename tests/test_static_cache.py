"""The static (preallocated) KV cache gives what the dynamic one gives: the same prefix states, the same hidden
state at every decode step and the same tokens, greedy and beam search, for a connector model on right-padded
prompts and ragged clips and for the foveated model in every mode (its autoregressive loop writing frame by
frame into the one static cache), clips of T = [3, 1, 0] frames and batches without frames (tiny random
configs, fp32)."""

from __future__ import annotations

import pytest
import torch

from config import MODES
from tests.tiny import frames, tiny_connector_model, tiny_model
from vlm.kvcache import StaticKV

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


def test_unwritten_slots_are_masked_not_skipped():
    """The buffer is allocated once for prefix + room, the prefix written at its start; `pad` gives every call the
    full-length mask with the unwritten tail masked, and refuses a mask longer than the buffer."""
    model = tiny_connector_model("mlp")
    fr, fm, ids, am = batch([2], [3])
    with torch.no_grad():
        pre = model.prefix(model.prepare(fr, fm), ids, am, True, None, 4)
    layer = pre.past.layers[0]
    assert layer.keys.shape[2] == pre.mask.shape[1] + 4 == pre.past.length
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
    compiling takes 10-70 s on this CPU, once per batch size."""
    model = tiny_connector_model("mlp")
    fr, fm, ids, am = batch([3, 1, 0], [4, 7, 2])
    with torch.no_grad():
        visual = model.prepare(fr, fm)
        kw = dict(max_new_tokens=6, eos_token_id=63)  # greedy: beam search compiles once more (batch B*K)
        compiled = model.generate(visual, ids, am, cache="static", compile=True, **kw)
        assert torch.equal(compiled, model.generate(visual, ids, am, **kw))
