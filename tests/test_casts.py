"""casts.py: constant weights cast to bf16 once give exactly what bf16 autocast gives, and nothing outside."""

from __future__ import annotations

import pytest
import torch

from config import ConfigError, load_config
from tests.test_model import USERS, user_turn_batch
from tests.tiny import tiny_model
from vlm.casts import CPU_BF16, ConstantCasts, use_bf16


def _frozen_llm_model(tokenizer):
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn", coarse_weight=1.0).train()
    model.llm.requires_grad_(False)  # lr 0, as optim.py freezes it
    model.encoder.dino.requires_grad_(False)
    return model


def _step(model, casts, batch):
    """Loss and connector gradients of one training step under bf16 autocast, with `casts` around it."""
    fr, fm, ids, am = batch
    labels = ids.masked_fill(am == 0, -100)
    model.zero_grad(set_to_none=True)
    with casts:
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(fr, fm, ids, am, labels, logits=False, mode="coarse_fine").loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_weights_cast_once_give_autocasts_loss_and_gradients_bit_for_bit(tokenizer):
    model = _frozen_llm_model(tokenizer)
    batch = user_turn_batch(tokenizer, [3, 1, 2], USERS)
    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    plain, g_plain = _step(model, ConstantCasts([model], enabled=False), batch)
    casts = ConstantCasts([model], enabled=True)
    cast, g_cast = _step(model, casts, batch)
    assert torch.equal(plain, cast) and g_plain.keys() == g_cast.keys() and g_cast
    assert all(torch.equal(g_plain[n], g_cast[n]) for n in g_plain)
    # outside the block every module holds its own fp32 parameters again; inside, the frozen Linears hold bf16
    # copies, the LM head tied to the embeddings among them (the embeddings keep their fp32 table), and the
    # connector (it trains) its own
    assert all((p.data_ptr(), p.dtype) == before[n] for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    head, embeddings = model.llm.get_output_embeddings(), model.llm.get_input_embeddings()
    assert head.weight is embeddings.weight
    with casts:
        assert head.weight.dtype == torch.bfloat16 and embeddings.weight.dtype == torch.float32
        assert model.llm.get_decoder().layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert model.dino_to_llm.weight.dtype == torch.float32
    assert head.weight is embeddings.weight
    # a frozen weight changed in place (a load) is cast again, not served stale
    with torch.no_grad():
        model.llm.get_decoder().layers[1].mlp.up_proj.weight.mul_(3.0)
    plain, g_plain = _step(model, ConstantCasts([model], enabled=False), batch)
    cast, g_cast = _step(model, casts, batch)
    assert torch.equal(plain, cast) and all(torch.equal(g_plain[n], g_cast[n]) for n in g_plain)


def test_evaluation_casts_every_weight_and_scores_as_autocast_does(tokenizer):
    """constant="all" (Answerer's bf16 reads): every Linear, trainable or not, cast once; the same scores."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="user_turn").eval()
    fr, fm, ids, am = user_turn_batch(tokenizer, [3, 1, 2], USERS)
    casts = ConstantCasts([model], enabled=True, constant="all")
    results = []
    for ctx in (ConstantCasts([model], enabled=False), casts):
        with torch.no_grad(), ctx, torch.autocast("cpu", torch.bfloat16):
            results.append(model(fr, fm, ids, am, mode="autoregressive").logits)
    assert torch.equal(*results)
    assert id(model.dino_to_llm.weight) in casts.copies and not casts.swapped
    with casts, casts:  # nested blocks share the outer one's copies and restore once
        assert model.dino_to_llm.weight.dtype == torch.bfloat16
    assert model.dino_to_llm.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="constant must be"):
        ConstantCasts([model], enabled=True, constant="some")


def test_bf16_auto_follows_the_hardware_and_other_words_are_refused(monkeypatch):
    """train.bf16 auto is bf16 only where the device does it in hardware (emulated on an AVX2 CPU, a step is many
    times slower than in fp32) and not on AMX tiles, or where FVLM_CPU_BF16 says the CPU has it or not."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(CPU_BF16, raising=False)
    avx512, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
    assert use_bf16("auto", cpu) == (avx512 and not amx) and use_bf16(True, cpu) and not use_bf16(False, cpu)
    for forced in (True, False):
        monkeypatch.setenv(CPU_BF16, str(int(forced)))
        assert use_bf16("auto", cpu) == forced and use_bf16(True, cpu) and not use_bf16(False, cpu)
    monkeypatch.delenv(CPU_BF16)
    for avx512, amx, auto in ((True, True, False), (True, False, True), (False, False, False), (False, True, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda a=avx512: a)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a)
        assert use_bf16("auto", cpu) == auto, (avx512, amx)  # AMX CPUs train in fp32 (vlm/casts.py says why)
    assert load_config(None, []).train.bf16 == "auto" and load_config(None, ["train.bf16=false"]).train.bf16 is False
    with pytest.raises(ConfigError, match="'train.bf16' must be one of \\('auto',\\), got 'maybe'"):
        load_config(None, ["train.bf16=maybe"])
