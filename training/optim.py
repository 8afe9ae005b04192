"""AdamW over three parameter groups — connector, vision tower, LLM — each with its own learning rate.

The published recipe trains the fresh connector 100× faster than the pretrained backbones. A group
whose rate is 0 is frozen outright (requires_grad False, no optimizer slot), so it costs no gradient
memory and stays bit-identical; so is the fourth group, "frozen" (the base LLM weights under LoRA).
The model names each parameter's group (VLM.group_of). With optim.lr_query set, the foveated model's query
parameters form a group of their own, "query"; unset, they stay in the connector's (so a run's optimizer state,
and an exact resume of it, is what it was before the option existed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from config import OptimConfig

GROUPS = ("connector", "vision", "llm")


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, fused: bool = False, group_of: Callable[[str], str] | None = None
) -> torch.optim.AdamW:
    """Freeze the groups with lr 0 (and the "frozen" group) and return AdamW over the rest; each group keeps
    `name` and `peak_lr`. `group_of` names each parameter's group (default: the model's own)."""
    group_of = group_of or model.group_of
    rates = {"connector": cfg.lr_connector, "vision": cfg.lr_vision, "llm": cfg.lr_llm, "frozen": 0.0}
    params: dict[str, list[nn.Parameter]] = {g: [] for g in (*GROUPS, "query", "frozen")}
    for name, p in model.named_parameters():
        params[group_of(name)].append(p)
    names = (*GROUPS, "frozen")
    if cfg.lr_query is not None:
        if not params["query"]:
            raise ValueError("optim.lr_query is set, but this model has no query parameters (only the foveated "
                             "model has them): remove the key")  # fmt: skip
        rates["query"], names = cfg.lr_query, (*GROUPS, "query", "frozen")
    else:
        params["connector"] += params.pop("query")
    groups = []
    for name in names:
        for p in params[name]:
            p.requires_grad_(rates[name] > 0)
        if rates[name] > 0 and params[name]:
            groups.append({"params": params[name], "name": name, "peak_lr": rates[name], "lr": rates[name]})
    if not groups:
        raise ValueError("every parameter group has learning rate 0: there is nothing to train")
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused)
