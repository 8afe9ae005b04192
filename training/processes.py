"""The processes of a run: one per device under torchrun (DDP), else one; their sums, and what a survivor says
when another process dies or stalls."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cli import UserError


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
