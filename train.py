"""Train a model: `python train.py --config configs/stage1.yaml [--set a.b=c ...]`.

`model.family` picks what is trained (families.py): the foveated VLM on WebDataset shards, any stage,
or the SmolVLM TokenLearner-QFormer variant on TextVQA (configs/smolvlm_textvqa.yaml). Stages 1-2
minimise next-token cross-entropy over the labelled tokens (data.stage decides which tokens are
labelled), stage 3 the DPO loss against a frozen copy of the starting model. Several
processes: `torchrun --nproc_per_node N train.py ...` (DDP; NCCL on GPU, gloo on CPU; each rank reads
its own slice of the shards).

A run is a pure function of its config: `train.resume: auto` continues from the newest checkpoint in
out_dir with the same weights, optimizer moments, RNG states and position in the data stream, so the
losses after a crash are the ones an uninterrupted run would have logged.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint as ckpt
from config import Config, ConfigError, load_config, save_config
from families import Family, batch_counts, for_config
from losses import batch_loss
from model import FoveatedVLM
from optim import build_optimizer
from runlog import RunLog
from schedule import Schedule


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


def init_dist() -> Dist:
    """One process per device; torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else a single process."""
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(int(os.environ.get("RANK", 0)), world_size, device)


class Stream:
    """This rank's training batches, epoch after epoch, keeping state.epoch / state.batches (this rank's data
    position) current and counting the samples the loader skipped as undecodable.

    Each rank moves to its next epoch when its own loader runs dry: ranks may hold different numbers of
    samples, and moving them together would drop (or repeat) what the others still had. Every call takes
    part in one collective, so a rank that cannot produce a batch stops all of them instead of hanging them.
    """

    def __init__(self, open_epoch: Callable[[int, int], Iterator[dict]], d: Dist, state: ckpt.TrainState) -> None:
        """`open_epoch(epoch, skip_batches)`: this rank's loader for an epoch, after its first skip_batches."""
        self.open_epoch, self.d, self.state = open_epoch, d, state
        self.skipped = 0
        self.it = self._open()

    def _open(self) -> Iterator[dict]:
        with torch.random.fork_rng(devices=[]):  # the DataLoader's seed draw must not move the training RNG
            return self.open_epoch(self.state.epoch, self.state.batches)

    def _take(self) -> dict | None:
        """The next batch of this epoch, passing over (and counting) empty markers; None at the epoch's end."""
        for batch in self.it:
            self.state.batches += 1
            self.skipped += sum(batch.pop("skipped").values())
            if batch.pop("keys"):
                batch.pop("index", None)
                return batch
        return None

    def next(self) -> dict[str, Tensor]:
        batch = self._take()
        if batch is None:  # this rank's epoch is over: the next one starts at once
            self.state.epoch, self.state.batches = self.state.epoch + 1, 0
            self.it = self._open()
            batch = self._take()
        if self.d.sum([batch is None])[0]:
            raise RuntimeError(
                f"a whole epoch of the training data yields no usable batch on {'this' if batch is None else 'another'}"
                " process: its shards are empty or every sample fails to decode (see the warnings above)"
            )
        return batch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_models(cfg: Config, family: Family, resume: Path | None) -> tuple[nn.Module, Any, nn.Module | None]:
    """(policy, processor, reference): the starting model, or the checkpoint's when resuming, with what
    prepares its inputs; stage 3 also keeps a frozen copy of the starting model as the DPO reference."""
    start = None
    if resume is None or cfg.data.stage == 3:
        init = cfg.train.init_from
        start = family.load(Path(init)) if init else family.new()
    policy, processor = family.load(resume / ckpt.MODEL_DIR) if resume else copy.deepcopy(start)
    reference = start[0].eval().requires_grad_(False) if cfg.data.stage == 3 else None
    return policy.train(), processor, reference


def find_resume(cfg: Config) -> Path | None:
    found = ckpt.list_checkpoints(cfg.train.out_dir)
    if cfg.train.resume == "auto":
        return found[-1] if found else None
    if cfg.train.resume == "none":
        if found:
            raise ValueError(f"{cfg.train.out_dir} already holds checkpoints; use resume: auto or a new out_dir")
        return None
    path = Path(cfg.train.resume)
    if not (path / ckpt.STATE_JSON).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a training checkpoint (no {ckpt.STATE_JSON})")
    return path


class Trainer:
    """One run's model, optimizer, data stream and position; `step()` is one optimizer step."""

    def __init__(self, cfg: Config, d: Dist, resume: Path | None) -> None:
        tc = cfg.train
        self.cfg, self.d, self.family = cfg, d, for_config(cfg)
        set_seed(tc.seed)
        self.raw, self.processor, self.reference = build_models(cfg, self.family, resume)
        self.raw.to(d.device)
        if self.reference is not None:
            self.reference.to(d.device)
        if tc.gradient_checkpointing:
            self.family.checkpoint_activations(self.raw)
        self.optimizer = build_optimizer(self.raw, cfg.optim, d.device.type == "cuda", self.family.group_of)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.state = ckpt.TrainState(world_size=d.world_size)
        if resume is not None:
            self.state = ckpt.load_training(resume, self.optimizer, d.rank, d.world_size)
        # every unused parameter (a text-only batch leaves the whole visual side idle) must be found
        self.ddp = (
            DistributedDataParallel(self.raw, find_unused_parameters=True, broadcast_buffers=False)
            if d.world_size > 1
            else None
        )
        self.model = self.ddp or self.raw
        if tc.compile:
            self.model = torch.compile(self.model)
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=tc.bf16 and d.device.type == "cuda")
        self.max_steps = tc.max_steps
        if tc.epochs:  # rounded up: the last step may reach into the next epoch, so all of the last one is seen
            self.max_steps = math.ceil(tc.epochs * self.family.epoch_batches(d.world_size) / tc.accumulate)
        o = cfg.optim
        self.schedule = Schedule(o.schedule, self.max_steps, o.warmup, o.target_lr, o.min_lr_ratio)
        self.stream = Stream(partial(self.family.loader, self.processor, d.rank, d.world_size), d, self.state)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        with self.autocast:
            return self.family.loss(model, batch, self.reference)

    def step(self) -> dict:
        """One optimizer step over `accumulate` micro-batches; returns its log row."""
        tc, d = self.cfg.train, self.d
        lrs = self.schedule.apply(self.optimizer, self.state.step)
        start, skipped = time.perf_counter(), self.stream.skipped
        data_s, loss_sum, samples, tokens = 0.0, torch.zeros((), device=d.device), 0, 0
        for micro in range(tc.accumulate):
            t = time.perf_counter()
            batch = self.stream.next()
            n, k = self.family.counts(self.raw, batch)
            batch = {key: v.to(d.device, non_blocking=True) for key, v in batch.items()}
            data_s += time.perf_counter() - t
            sync = self.ddp is None or micro == tc.accumulate - 1
            with nullcontext() if sync else self.ddp.no_sync():
                loss = self.loss(self.model, batch)
                (loss / tc.accumulate).backward()
            loss_sum, samples, tokens = loss_sum + loss.detach().float(), samples + n, tokens + k
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        loss_sum, samples, tokens, skipped = d.sum([loss_sum.item(), samples, tokens, self.stream.skipped - skipped])
        seconds = time.perf_counter() - start
        return {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss_sum / (tc.accumulate * d.world_size),
            **{f"lr_{name}": lr for name, lr in lrs.items()},
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "data_s": data_s,
            "compute_s": seconds - data_s,
            "skipped": int(skipped),
        }

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over up to val_batches validation batches per process. It runs the unwrapped model
        with no collective inside, so a rank with fewer batches cannot hang the others."""
        self.raw.eval()
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            loader = self.family.loader(self.processor, self.d.rank, self.d.world_size, split="val")
            batches = (batch for batch in loader if batch["keys"])  # empty markers carry no sample
            for batch in itertools.islice(batches, self.cfg.train.val_batches):
                batch = {k: v.to(self.d.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
                total, count = total + self.loss(self.raw, batch).item(), count + 1
        self.raw.train()
        total, count = self.d.sum([total, count])
        return total / max(count, 1)

    def save(self) -> None:
        """Checkpoint (rank 0 writes, with every rank's RNG state and data position) and prune old checkpoints."""
        local = (ckpt.rng_state(), [self.state.epoch, self.state.batches])
        gathered = [local]
        if self.d.world_size > 1:
            gathered = [None] * self.d.world_size
            dist.all_gather_object(gathered, local)
        rngs = [rng for rng, _ in gathered]
        self.state.positions = [position for _, position in gathered]  # every rank's own place in its data
        if self.d.rank == 0:
            tc = self.cfg.train
            path = ckpt.checkpoint_dir(tc.out_dir, self.state.step)
            write = partial(self.family.write, self.raw, self.processor)
            ckpt.save_training(path, write, self.optimizer, self.state, rngs, self.cfg)
            ckpt.prune_checkpoints(tc.out_dir, tc.keep_last, tc.keep_best)
        if self.d.world_size > 1:
            dist.barrier()


def train(cfg: Config) -> Path:
    """Run (or continue) the configured training; returns the directory of the final model."""
    for_config(cfg)  # the checks that span config sections, before any work
    tc, out = cfg.train, Path(cfg.train.out_dir)
    d = init_dist()
    log = RunLog(cfg, enabled=d.rank == 0)  # fails here, before any work, if wandb is asked for but missing
    run = Trainer(cfg, d, find_resume(cfg))
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / ckpt.RUN_CONFIG)
    log.start(run.state.step)
    bar = tqdm(total=run.max_steps, initial=run.state.step, disable=d.rank != 0, dynamic_ncols=True)
    while run.state.step < run.max_steps:
        row = run.step()
        if tc.val_every and run.state.step % tc.val_every == 0:
            row["val_loss"] = run.validate()
        log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if run.state.step % tc.save_every == 0 or run.state.step == run.max_steps:
            run.state.metric = row.get(tc.best_metric)
            run.save()
    bar.close()
    log.close()
    final = out / "final"
    if d.rank == 0:
        ckpt.save_atomic(final, partial(run.family.write, run.raw, run.processor))
        run.family.finish(run.raw, run.processor)
    if d.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def throughput(
    model: FoveatedVLM,
    batch: dict[str, Tensor],
    mode: str = "coarse_fine",
    steps: int = 10,
    warmup: int = 2,
    bf16: bool = False,
) -> dict[str, float]:
    """Training speed of forward + backward on one batch (already on the model's device), repeated.

    The optimizer step is left out: it costs the same in every forward mode, and leaving it out keeps
    the model unchanged, so several modes can be timed on one model and one batch.
    """
    model.train()
    samples, tokens = batch_counts(batch, model.config.glimpses)
    device = batch["frames"].device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def step() -> None:
        with autocast:
            loss = batch_loss(model, batch, mode)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "step_s": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.config, args.set))
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
