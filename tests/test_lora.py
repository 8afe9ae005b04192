"""LoRA through peft on tiny random causal LMs: names, freezing, exactness at init, merge, save/load, dropout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from config import LoraConfig
from vlm.lora import add_lora, has_lora, is_lora_param, merge_lora

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


# Adapters saved and loaded alone, as a user of peft would; the model directory keeps them in adapter.safetensors.
def lora_state_dict(llm: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors alone, named as in `llm.state_dict()`, so `load_lora_state_dict` after a fresh
    `add_lora` with the same options restores them."""
    return {name: t for name, t in llm.state_dict().items() if is_lora_param(name)}


def load_lora_state_dict(llm: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter tensors into an llm that `add_lora` prepared; both sides' adapter names must agree exactly,
    since a silently missing adapter would leave its B at zero."""
    expected = {name for name in llm.state_dict() if is_lora_param(name)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not match the LLM's adapters (same targets and rank?): missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    llm.load_state_dict(state, strict=False)


def randomize(module: nn.Module, seed: int, std: float = 0.2, only: str = "") -> nn.Module:
    """Non-trivial values in every parameter whose name contains `only` (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only in name:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + std * noise if "norm" in name and name.endswith("weight") else std * noise)
    return module


def llama(seed: int = 0) -> LlamaForCausalLM:
    return randomize(LlamaForCausalLM(LlamaConfig(**SIZES)), seed).eval()


def qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2's q/k/v carry biases, so the renaming of a bias shows too."""
    return randomize(Qwen2ForCausalLM(Qwen2Config(**SIZES)), seed).eval()


def adapted(options: LoraConfig | None = None, seed: int = 0, b_seed: int | None = None) -> LlamaForCausalLM:
    """A tiny llama with adapters; `b_seed` randomises the B matrices, which peft starts at zero."""
    torch.manual_seed(100 + seed)  # peft draws A from the global generator
    llm = add_lora(llama(seed), options or LoraConfig())
    return llm if b_seed is None else randomize(llm, b_seed, std=0.1, only="lora_B")


def ids(rows: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(7))


def logits(llm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return llm(input_ids=x).logits


@pytest.mark.parametrize("build,biased", [(llama, False), (qwen2, True)])
def test_names_change_only_by_base_layer_infix_and_adapters(build, biased):
    plain = dict(build().named_parameters())
    llm = add_lora(build(), LoraConfig(targets=ATTENTION + MLP))
    assert type(llm) is type(build())  # same transformers class: nothing wraps it
    names = dict(llm.named_parameters())
    targets = {n.rsplit(".", 1)[0] for n in plain if n.rsplit(".", 2)[-2] in ATTENTION + MLP}
    assert len(targets) == 2 * 7
    expected = set()
    for name in plain:
        module, _, leaf = name.rpartition(".")
        expected.add(f"{module}.base_layer.{leaf}" if module in targets else name)
    for module in targets:
        expected |= {f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"}
    assert set(names) == expected
    assert any(n.endswith("q_proj.base_layer.bias") for n in names) == biased
    for name, p in names.items():
        assert p.requires_grad == is_lora_param(name), name
    assert {is_lora_param(n) for n in plain} == {False}
    assert has_lora(llm) and not has_lora(build())
    assert set(lora_state_dict(llm)) == {n for n in names if is_lora_param(n)}


def test_default_targets_and_shapes():
    llm = adapted(LoraConfig(r=8, alpha=16.0))
    q = llm.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (8, 32) and q.lora_B["default"].weight.shape == (32, 8)
    assert q.scaling["default"] == 2.0
    adapters = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_state_dict(llm)}
    assert adapters == {"q_proj", "v_proj"}
    assert isinstance(llm.model.layers[0].self_attn.k_proj, nn.Linear)


def test_adapters_start_as_the_plain_model_exactly():
    x = ids()
    assert torch.equal(logits(adapted(LoraConfig(targets=ATTENTION + MLP)), x), logits(llama(), x))


def test_adamw_steps_change_adapters_and_leave_the_base_bit_identical():
    llm = adapted(LoraConfig(targets=ATTENTION + MLP, dropout=0.1)).train()
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    # every parameter is handed to the optimizer, with weight decay: frozen ones must still not move
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-2, weight_decay=0.1)
    x = ids()
    for _ in range(2):  # B starts at 0, so A gets no gradient until B has moved
        opt.zero_grad()
        llm(input_ids=x, labels=x).loss.backward()
        opt.step()
    for name, p in llm.named_parameters():
        if is_lora_param(name):
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[name]), f"{name} changed"


def test_merge_gives_the_same_logits_and_plain_linears(tmp_path):
    x = ids()
    llm = adapted(LoraConfig(targets=ATTENTION + MLP), b_seed=3)
    unmerged = logits(llm, x)
    assert not torch.allclose(unmerged, logits(llama(), x), atol=1e-3)  # the adapters do something
    assert merge_lora(llm) is llm
    assert (logits(llm, x) - unmerged).abs().max() <= 1e-5
    assert not has_lora(llm) and not hasattr(llm, "peft_config")
    for layer in llm.model.layers:
        for m in [*(getattr(layer.self_attn, t) for t in ATTENTION), *(getattr(layer.mlp, t) for t in MLP)]:
            assert type(m) is nn.Linear
    assert set(llm.state_dict()) == set(llama().state_dict())
    llm.save_pretrained(tmp_path)  # an ordinary transformers checkpoint again
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, x) - unmerged).abs().max() <= 1e-5


def test_saved_adapters_reload_into_a_fresh_model(tmp_path):
    options = LoraConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    x = ids()
    trained = adapted(options, b_seed=5)
    path = tmp_path / "lora.safetensors"
    save_file(lora_state_dict(trained), str(path))
    fresh = randomize(adapted(options), 11, only="lora_A")  # the same base, its own A, B = 0
    assert not torch.equal(logits(fresh, x), logits(trained, x))
    load_lora_state_dict(fresh, load_file(str(path)))
    assert torch.equal(logits(fresh, x), logits(trained, x))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(adapted(LoraConfig(targets=ATTENTION)), load_file(str(path)))


def test_unknown_or_tied_targets_raise():
    with pytest.raises(ValueError, match="'qproj'"):
        add_lora(llama(), LoraConfig(targets=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match="'lm_head'.*tied"):
        add_lora(llama(), LoraConfig(targets=["lm_head"]))
    with pytest.raises(ValueError, match="empty"):
        add_lora(llama(), LoraConfig(targets=[]))
    with pytest.raises(ValueError, match="already"):
        add_lora(adapted(), LoraConfig())


def test_dropout_is_random_in_train_mode_only():
    llm = adapted(LoraConfig(dropout=0.5), b_seed=2)
    x = ids()
    llm.train()
    with torch.no_grad():
        a, b = llm(input_ids=x).logits, llm(input_ids=x).logits
    assert not torch.equal(a, b)
    llm.eval()
    assert torch.equal(logits(llm, x), logits(llm, x))
