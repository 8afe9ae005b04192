"""The constant weights of a bf16-autocast run cast once, not at every call.

Under autocast a Linear's fp32 weight is cast to bf16 each time the layer runs, and autocast keeps the cast only
for weights that train (leaves that require grad), within one autocast block. A frozen backbone (lr 0) or a model
being evaluated is constant, yet with short sequences on a CPU recasting it is a large share of each call's
time (the 135M LLM's Linear weights, and its 49152-word output layer, read in fp32 and written in bf16 at every
one of a step's LLM calls).

Inside a `ConstantCasts` block each constant Linear's weight and bias are bf16 copies made once: autocast would
have rounded them to exactly those values, so every matmul under autocast gives the same result. The block
must hold the backward too (autograd keeps the bf16 weight it multiplied with), so it is its own context rather
than part of autocast's, which should hold only the forward. The copies stand in the Linear modules' parameter
slots, not in the parameters: an output layer tied to the input embeddings gets a bf16 copy while the
embeddings keep their fp32 table, and outside the block every module holds its own fp32 parameters again
(saving, the optimizer and fp32 code see nothing of it). A copy is made again when its parameter changed since
(an optimizer step or a load bumps the version; a move gives a new tensor).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

CPU_BF16 = "FVLM_CPU_BF16"  # "1" / "0": take the CPU to have bf16 units or not, whatever it has


def bf16_native(device: torch.device) -> bool:
    """Whether `device` does bf16 arithmetic in hardware: a CUDA GPU that supports it, or a CPU with avx512_bf16
    or AMX. Elsewhere (an AVX2-only CPU) autocast emulates bf16, and a step is many times slower than in fp32.
    FVLM_CPU_BF16=1 or 0 decides for the CPU instead, so that one machine can run what `train.bf16: auto` does on
    either kind (the test suite run both ways)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        forced = os.environ.get(CPU_BF16, "").strip()
        if forced in ("0", "1"):
            return forced == "1"
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """`train.bf16` on a device: true and false as said; "auto" bf16 where the hardware does it (bf16_native) and a
    run has been measured to train as well in it as in fp32: a GPU, or a CPU with avx512_bf16 and no AMX tiles. On
    a CPU with AMX (oneDNN runs bf16 matmuls on its tiles) the toy run trained in bf16 read 21 points below fp32,
    and a second run of the same config gave other numbers, for a run 5 % shorter (docs/training.md): there auto
    is fp32, unless FVLM_CPU_BF16=1 says otherwise."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cpu" and os.environ.get(CPU_BF16, "").strip() not in ("0", "1"):
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            return False
    return bf16_native(device)


def stamp(p: Tensor) -> tuple[int, int]:
    """What changes when a tensor is changed or replaced: its address and version (an inference tensor, which
    cannot be changed outside inference mode, has no version: -1)."""
    return p.data_ptr(), -1 if p.is_inference() else p._version


class ConstantCasts:
    """`with ConstantCasts(models, enabled, constant):` the constant Linear weights of `models` in bf16, each cast
    once (see the module docstring); nothing when not `enabled` (an fp32 run). `constant` says which are
    constant: "frozen" (those that do not require grad: training) or "all" (evaluation: nothing trains)."""

    def __init__(self, models: list[nn.Module | None], enabled: bool, constant: str = "frozen"):
        if constant not in ("frozen", "all"):
            raise ValueError(f"constant must be 'frozen' or 'all', not {constant!r}")
        self.models = [m for m in models if m is not None]
        self.enabled, self.constant = enabled, constant
        self.copies: dict[int, tuple[tuple[int, int], Tensor]] = {}  # id(param) -> (stamp of the param, copy)
        self.swapped: list[tuple[nn.Module, str, nn.Parameter]] = []  # (module, slot, the parameter it held)
        self.depth = 0  # nested entries share the outermost one's copies

    def _copy(self, p: nn.Parameter) -> nn.Parameter:
        now = stamp(p)
        held = self.copies.get(id(p))
        if held is None or held[0] != now:
            with torch.inference_mode(False):  # a block opened in inference mode must not make inference copies
                held = now, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
            self.copies[id(p)] = held
        return held[1]

    def __enter__(self) -> ConstantCasts:
        self.depth += 1
        if self.enabled and self.depth == 1:
            for model in self.models:
                for module in model.modules():
                    if not isinstance(module, nn.Linear):
                        continue
                    for slot, p in module._parameters.items():
                        if p is None or p.dtype != torch.float32 or (self.constant == "frozen" and p.requires_grad):
                            continue
                        self.swapped.append((module, slot, p))
                        module._parameters[slot] = self._copy(p)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            for module, slot, p in reversed(self.swapped):
                module._parameters[slot] = p
            self.swapped = []
