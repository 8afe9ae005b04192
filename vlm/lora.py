"""LoRA adapters on the LLM's projections, through peft, injected in place.

`peft.inject_adapter_in_model` swaps each targeted `nn.Linear` for a peft LoRA layer inside the llm itself, so the
llm keeps its transformers class (get_decoder, get_input_embeddings, forward, generation all unchanged) and the model
holding it needs no wrapper. What changes in `llm.named_parameters()` / `state_dict()`, for each targeted module M
(e.g. `model.layers.0.self_attn.q_proj`):

    M.weight               -> M.base_layer.weight          (and M.bias -> M.base_layer.bias where there is one)
    (new)                     M.lora_A.default.weight      (r, in_features), random (kaiming uniform)
    (new)                     M.lora_B.default.weight      (out_features, r), zeros: the adapted llm starts equal
                                                           to the plain one

Every other name is untouched. `merge_lora` folds B·A·alpha/r into `M.base_layer.weight` and puts that Linear back
at M, so the names return to the plain model's and the llm saves and loads as an ordinary transformers checkpoint.
"""

from __future__ import annotations

import re

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from config import LoraConfig

_LORA_PARAM = re.compile(r"(^|\.)lora_")


def has_lora(llm: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in llm.modules())


def is_lora_param(name: str) -> bool:
    """Adapter parameters by name (`...q_proj.lora_A.default.weight`), for optimizer groups and saving."""
    return _LORA_PARAM.search(name) is not None


def _resolve_targets(llm: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linear modules the suffixes name, matched as peft does (whole dotted components).

    Checked here rather than left to peft, which only fails when no target at all matches, so a misspelt
    target next to a right one would silently adapt less than asked."""
    if not targets:
        raise ValueError("model.lora.targets is empty: name at least one projection, e.g. ['q_proj', 'v_proj']")
    linears = {name: m for name, m in llm.named_modules() if isinstance(m, nn.Linear)}
    embedding = llm.get_input_embeddings() if hasattr(llm, "get_input_embeddings") else None
    chosen: list[str] = []
    for target in targets:
        hits = [name for name in linears if name == target or name.endswith("." + target)]
        if not hits:
            known = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"LoRA target {target!r} matches no Linear module of the LLM; its Linear names: {known}")
        for name in hits:
            if embedding is not None and linears[name].weight is getattr(embedding, "weight", None):
                raise ValueError(
                    f"LoRA target {target!r} matches {name!r}, whose weight is tied to the input embeddings: "
                    "merging would change the embeddings too"
                )
        chosen += [name for name in hits if name not in chosen]
    return chosen


def add_lora(llm: nn.Module, options: LoraConfig) -> nn.Module:
    """Inject adapters into `llm` in place and freeze everything else in it; returns `llm`. `options`: r, alpha
    (the update is scaled by alpha / r), dropout (on the adapter's input only), targets (Linear name suffixes).

    peft's default init (B = 0) makes the adapted llm compute exactly what the plain one does until the first step.
    Adapters take the device and dtype of the Linear they wrap (a bf16 base gets bf16 adapters)."""
    if has_lora(llm):
        raise ValueError("the LLM already has LoRA adapters; merge_lora first to add new ones")
    if options.r < 1:
        raise ValueError(f"LoRA rank r must be at least 1, got {options.r}")
    if not 0.0 <= options.dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {options.dropout}")
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=_resolve_targets(llm, list(options.targets)),  # full names: peft adapts exactly these
        bias="none",
    )
    out = peft.inject_adapter_in_model(config, llm)
    assert out is llm, "peft returned another module: the llm was not adapted in place"
    return llm


def merge_lora(llm: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain Linear back (export); returns `llm`.

    The merged weights keep the base's requires_grad (False): merging is for export, not for training on. peft
    writes the merge through `.data`, which leaves a weight's version as it was; each merged weight's version is
    then bumped, so whatever keeps a copy of a weight by its version (casts.ConstantCasts, the head cache) makes
    it again."""
    tuned = [name for name, m in llm.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in tuned:
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name)
        layer = getattr(parent, child)
        layer.merge()
        base = layer.get_base_layer()
        with torch.no_grad():
            for p in base.parameters(recurse=False):
                p.add_(0)  # an in-place op: the version moves, the values stay
        setattr(parent, child, base)
    if hasattr(llm, "peft_config"):  # peft's record of the injected adapters, stale once they are gone
        del llm.peft_config
    return llm
