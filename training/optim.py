"""AdamW over three parameter groups — connector, vision tower, LLM — each with its own learning rate.

The published recipe trains the fresh connector 100× faster than the pretrained backbones. A group
whose rate is 0 is frozen outright (requires_grad False, no optimizer slot), so it costs no gradient
memory and stays bit-identical; so is the fourth group, "frozen" (the base LLM weights under LoRA).
The model names each parameter's group (VLM.group_of). With optim.lr_query set, the foveated model's query
parameters form a group of their own, "query"; unset, they stay in the connector's (so a run's optimizer state,
and an exact resume of it, is what it was before the option existed).

On CUDA the AdamW is torch's fused one (one kernel per step for all tensors rather than a loop over them), chosen
when every trained parameter is on a CUDA device. optim.optimizer adamw8bit keeps the two moments in 8 bits
(bitsandbytes' AdamW8bit, block-wise quantised): a quarter of fp32 AdamW's state memory. bitsandbytes is an
optional dependency and its optimizers run on CUDA only, so anything else is refused before the run starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from config import ConfigError, OptimConfig

try:  # optional: only optim.optimizer adamw8bit needs it
    import bitsandbytes.optim
except ImportError:
    bitsandbytes = None

GROUPS = ("connector", "vision", "llm")


def fused_on(devices: Iterable[torch.device]) -> bool:
    """Whether torch's fused AdamW runs over parameters on these devices: every one on CUDA (and at least one)."""
    types = {torch.device(d).type for d in devices}
    return types == {"cuda"}


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, fused: bool | None = None, group_of: Callable[[str], str] | None = None
) -> torch.optim.Optimizer:
    """Freeze the groups with lr 0 (and the "frozen" group) and return AdamW over the rest; each group keeps
    `name` and `peak_lr`. `group_of` names each parameter's group (default: the model's own); `fused` (torch's
    AdamW): default where every trained parameter is on CUDA (`fused_on`)."""
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
    devices = [p.device for g in groups for p in g["params"]]
    if cfg.optimizer == "adamw8bit":
        return _adamw8bit(groups, cfg.weight_decay, devices)
    fused = fused_on(devices) if fused is None else fused
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused)


def _adamw8bit(groups: list[dict], weight_decay: float, devices: list[torch.device]) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit over `groups`, or one line saying what is missing."""
    if not fused_on(devices):
        where = ", ".join(sorted({str(d) for d in devices}))
        raise ConfigError(f"'optim.optimizer' adamw8bit runs on CUDA only (bitsandbytes), but the parameters are on "
                          f"{where}: set optim.optimizer=adamw")  # fmt: skip
    if bitsandbytes is None:
        raise ConfigError("'optim.optimizer' adamw8bit needs bitsandbytes: pip install bitsandbytes (or set "
                          "optim.optimizer=adamw)")  # fmt: skip
    return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
