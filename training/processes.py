"""The processes of a run: one per device under torchrun, else one; their sums, how they hold the model (DDP: a
whole copy each; FSDP: a shard each), and what a survivor says when another process dies or stalls."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from cli import UserError
from vlm.base import VLM


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Sum `values` over all processes."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        """The largest `value` over all processes."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, dist.ReduceOp.MAX)
        return int(t.item())


def init_dist(timeout: float) -> Dist:
    """One process per device; torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else a single process. A collective
    that waits `timeout` seconds for a process that has died fails instead of hanging."""
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    return Dist(int(os.environ.get("RANK", 0)), world_size, device)


@contextmanager
def lost_peers(d: Dist, step: Callable[[], int]) -> Iterator[None]:
    """A collective that fails because another process died (a closed connection) or stalled (train.ddp_timeout)
    becomes one clear error on the survivors instead of a backend traceback; `step()`: the steps done by then."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if d.world_size == 1 or not (isinstance(e, dist.DistError) or any(w in text for w in _PEER_LOST)):
            raise
        raise UserError(
            f"process {d.rank} lost the other processes at step {step() + 1} ({text.splitlines()[0][:160]}): "
            "one of them died or stalled, see its log; then continue with train.resume=auto"
        ) from e


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Socket Timeout")


# ---- FSDP (train.parallel: fsdp) ---------------------------------------------------------------------------
#
# FSDP2 (torch.distributed.fsdp.fully_shard) keeps 1/N of every parameter, gradient and AdamW moment on each of
# the N processes. A unit's parameters are gathered whole just before it runs and freed after; its gradients are
# reduce-scattered back to the shards. Each gather is a collective, so every process must run the same units the
# same number of times, in the same order.
#
# Units: every decoder layer of the LLM, then the root (everything else: embeddings, LM head, connector, vision
# tower), gathered once per forward and kept until its backward is done. The vision tower stays in the root
# because no FSDP hook could gather its layers: the foveated encoder reads a DINOv2 layer's projections and
# norms directly (encoder.py) and never calls the layer's forward, where FSDP's hooks sit, and a tower kind skips
# its tower on a batch without frames. DINOv2-small is 22M parameters, 1.3 % of the 1.7B model.


def shard(model: VLM, bf16: bool, device: torch.device) -> None:
    """Apply FSDP2 to `model` in place (its parameters become DTensor shards; names are unchanged). With `bf16`
    the gathered parameters are bf16 and gradients are reduced in fp32 (the optimizer's weights and moments stay
    fp32 shards); without, everything stays fp32.

    Where one LLM call reads the keys and values another left in a KV cache (a head before the frames, shared by
    every row; the autoregressive read, a call per frame), a decoder layer's backward for one call can run after
    FSDP's hook for another call freed the layer: those hooks see a call's returned hidden states, not its cache.
    Such a model keeps each decoder layer whole from its first use in backward until `reshard` (after the
    backward): its gradients are still reduce-scattered per call, but the whole LLM is gathered at the
    backward's end."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    cached = len(model.head_ids) > 0 or model.uses_cache(**model.train_read)
    for layer in model.decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        layer.set_reshard_after_backward(not cached)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # the root's output holds views (the read's attention map, transposed); FSDP warns of in-place writes into
    # them, which the loop never makes
    warnings.filterwarnings("ignore", rf"FSDP2-wrapped module \({type(model).__name__}\) returned a view", UserWarning)
    # a parameter that got no gradient on this process but did on another (the answer head of a batch without
    # labels) is reduced as zeros, as DDP's find_unused_parameters does, so every reduce-scatter has the same size
    model.set_reduce_scatter_unused_params(True)


def reshard(model: nn.Module) -> None:
    """Free every gathered unit of a sharded model (after a backward, before the optimizer changes the shards)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def drop_unused_grads(params: list[nn.Parameter], d: Dist) -> None:
    """Give no gradient to a parameter that got none on any process (a sharded run reduces it as zeros, see
    `shard`), as DDP does: AdamW then leaves it alone, where a zero gradient would still decay it and its
    moments. Known from its gradient being zero on every process: one small all-reduce per step."""
    grads = [p.grad for p in params]
    local = [(g.to_local() if isinstance(g, DTensor) else g) for g in grads if g is not None]
    found = torch.stack([g.ne(0).any() for g in local]).double() if local else torch.zeros(0, dtype=torch.float64)
    used = iter(d.sum(found.tolist()))
    for p in params:
        if p.grad is not None and not next(used):
            p.grad = None


def clip_grads(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_, whose norm of sharded gradients is a DTensor: made whole (one all-reduce)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """The sharded model's whole state dict and its optimizer's, on process 0's CPU (empty dicts elsewhere); every
    process must call it. The optimizer's is numbered as `optimizer.state_dict()` numbers it (parameters in group
    order), so a checkpoint is the same whether DDP or FSDP wrote it."""
    weights = get_model_state_dict(model, options=_WHOLE)
    if not optimizer.state:  # no step taken yet; get_optimizer_state_dict would take a zero step to make moments
        return weights, optimizer.state_dict()
    whole = get_optimizer_state_dict(model, optimizer, options=_WHOLE)
    if not whole:
        return weights, {}
    index = {name: i for i, name in enumerate(n for g in whole["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in whole["param_groups"]]
    return weights, {"state": {index[n]: slot for n, slot in whole["state"].items()}, "param_groups": groups}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state dict numbered as `optimizer.state_dict()` numbers it (every process holds it)
    into the optimizer of the sharded `model`: each process keeps its shard of every moment."""
    if not state["state"]:  # nothing to shard (saved before the first step)
        optimizer.load_state_dict(state)
        return
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    whole = {
        "state": {order[int(i)]: slot for i, slot in state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    # not strict: a parameter that never got a gradient (DINOv2's mask token) has no moments, as in DDP; DCP then
    # keeps the zero moments it made for it (it takes a step at lr 0 first), which the run never had: drop them
    set_optimizer_state_dict(model, optimizer, whole, options=StateDictOptions(full_state_dict=True, strict=False))
    kept = {order[int(i)] for i in state["state"]}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if names[id(p)] not in kept:
                optimizer.state.pop(p, None)
