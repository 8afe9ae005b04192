"""Train a model: `python train.py --config configs/stage1.yaml [--set a.b=c ...]`.

`model.kind` picks what is trained (registry.py): the foveated VLM, a vision tower with any connector
(pixel_shuffle, mlp, cls_gate, tokenlearner_qformer), or SmolVLM, all on the same data sources (data.py)
through each model's processor (processors.py). Stages 1-2 minimise next-token cross-entropy over the labelled
tokens (data.stage decides which tokens are labelled), stage 3 the DPO loss against a frozen copy of the
starting model. Several processes: `torchrun --nproc_per_node N train.py ...` (NCCL on GPU, gloo on CPU; each
rank reads its own slice of the data), on several machines with torchrun's --nnodes and a c10d rendezvous; each
process holds a whole copy of the model (train.parallel: ddp) or a shard of it (fsdp: training/processes.py).
The loop knows only the base model interface (vlm/base.py).

A run is a pure function of its config: `train.resume: auto` continues from the newest checkpoint in
out_dir with the same weights, optimizer moments, RNG states and position in the data stream, so the
losses after a crash are the ones an uninterrupted run would have logged.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import cli
import data
import registry
from cli import UserError
from config import Config, ConfigError, ModelConfig, load_config, save_config
from evals.answering import Answerer
from inputs.frames import MediaError
from inputs.processors import processor_for
from layouts.readers import open_reader
from layouts.shards import exchange, meta_of
from training import checkpoints as ckpt
from training import processes
from training.optim import build_optimizer
from training.processes import Dist, init_dist, lost_peers
from training.runlog import RunLog
from training.schedule import Schedule
from vlm import saved
from vlm.base import VLM, configure_compile
from vlm.casts import ConstantCasts, bf16_native, use_bf16
from vlm.loss import batch_losses


class NonFinite(UserError):
    """Too many steps in a row whose loss or gradient was NaN/inf."""


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
        self.drawn: Counter = Counter()  # samples trained on, by source index: the mix's realised shares
        self.it = self._open()

    def _open(self) -> Iterator[dict]:
        with torch.random.fork_rng(devices=[]):  # the DataLoader's seed draw must not move the training RNG
            return self.open_epoch(self.state.epoch, self.state.batches)

    def _take(self) -> dict | None:
        """The next batch of this epoch, passing over (and counting) empty markers; None at the epoch's end."""
        for batch in self.it:
            self.state.batches += 1
            self.skipped += sum(batch.pop("skipped").values())
            self.drawn.update(batch.pop("sources", []))
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


class SlowSteps:
    """Says once when a step is far slower than the run's first ones were. On a machine with few cores, torch's
    default threads spinning against another process's make each step 20-40x slower, and nothing else shows it."""

    FIRST = 5  # steps whose median is the run's normal pace (the median passes over a slow first step)
    FACTOR = 5.0

    def __init__(self, enabled: bool) -> None:
        """`enabled` is True on the process that prints (rank 0) when the run trains on the CPU."""
        self.enabled, self.first = enabled, []

    def see(self, step: int, seconds: float) -> None:
        if not self.enabled:
            return
        if len(self.first) < self.FIRST:
            self.first.append(seconds)
            return
        pace = statistics.median(self.first)
        if seconds > self.FACTOR * pace > 0:
            self.enabled = False  # once per run: the cause, if it is this one, stays for the run
            tqdm.write(  # above the progress bars, which a print would break
                f"warning: step {step} took {seconds:.1f} s, {seconds / pace:.0f}x the {pace:.2f} s of the first "
                f"steps; torch runs {torch.get_num_threads()} threads on {os.cpu_count()} CPUs: if other jobs share "
                "them, start each with OMP_NUM_THREADS=1",
                file=sys.stderr,
            )


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# model keys a run reads when it starts from a saved model
TRAINING_KEYS = frozenset({"kind", "mode", "coarse_weight", "fine_passes"})


def start_model(cfg: Config) -> VLM:
    """The model a run starts from: train.init_from (its architecture as saved: of the model section only the
    kind and the training options apply, and any other key it sets must agree with the saved model), or a new
    one around pretrained backbones. Its frame settings are the run's."""
    init = cfg.train.init_from
    if not init:
        return feed(registry.new_model(cfg.model), cfg)
    model = with_training_options(registry.load(init), cfg.model, f"train.init_from {init}")
    for key in sorted(getattr(cfg.model, "given", frozenset()) - TRAINING_KEYS):
        if getattr(cfg.model, key) != getattr(model.config, key, None):
            raise ConfigError(
                f"model.{key} is {getattr(cfg.model, key)!r}, but train.init_from {init} was saved with "
                f"{getattr(model.config, key, None)!r}: the model keeps its architecture (only {sorted(TRAINING_KEYS)}"
                " apply); remove the key or make it agree"
            )
    return feed(model, cfg)


def with_training_options(model: VLM, wanted: ModelConfig, where: str) -> VLM:
    """The saved model with the run's training options (mode, coarse_weight, fine_passes) where its kind has them."""
    if model.kind != wanted.kind:
        raise ConfigError(f"{where} holds a {model.kind} model, but model.kind is {wanted.kind}")
    keys = {k: getattr(wanted, k) for k in TRAINING_KEYS - {"kind"} if hasattr(wanted, k)}
    model.config = dataclasses.replace(model.config, **keys)
    return model


def feed(model: VLM, cfg: Config) -> VLM:
    """Stamp the run's frame settings on the model, so that it is saved with them."""
    d = cfg.data
    model.frames = dataclasses.replace(
        model.frames, size=d.frame_size, max_frames=d.max_frames, image_frames=d.replicate_image_frames, fps=d.fps
    )
    return model


def build_models(cfg: Config, resume: Path | None) -> tuple[VLM, VLM | None]:
    """(policy, reference): the starting model, or the checkpoint's when resuming; stage 3 also keeps a frozen
    copy of the starting model as the DPO reference."""
    start = start_model(cfg) if resume is None or cfg.data.stage == 3 else None
    if resume is None:
        policy = copy.deepcopy(start) if cfg.data.stage == 3 else start
    else:
        policy = feed(with_training_options(registry.load(resume / ckpt.MODEL_DIR), cfg.model, str(resume)), cfg)
    reference = start.eval().requires_grad_(False) if cfg.data.stage == 3 else None
    return policy.train(), reference


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint a run continues from: with resume auto the newest whole one (a damaged one is passed over,
    saying so), none for a new run (refused if out_dir already holds checkpoints), or the one named."""
    found = ckpt.list_checkpoints(cfg.train.out_dir)
    if cfg.train.resume == "auto":
        for path in reversed(found):
            problem = ckpt.damage(path)
            if problem is None:
                return path
            print(f"warning: not resuming from {path.name}: {problem}; trying the one before", file=sys.stderr)
        if found:
            raise UserError(f"every checkpoint in {cfg.train.out_dir} is damaged: start anew in another out_dir")
        return None
    if cfg.train.resume == "none":
        if found:
            raise UserError(f"{cfg.train.out_dir} already holds checkpoints: set train.resume=auto to continue the "
                            "run, or choose another train.out_dir")  # fmt: skip
        return None
    path = Path(cfg.train.resume)
    if not (path / ckpt.STATE_JSON).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a training checkpoint (no {ckpt.STATE_JSON})")
    if problem := ckpt.damage(path):
        raise UserError(f"train.resume: {problem}")
    return path


class Trainer:
    """One run's model, optimizer, data stream and position; `step()` is one optimizer step."""

    def __init__(self, cfg: Config, d: Dist, resume: Path | None) -> None:
        tc = cfg.train
        self.cfg, self.d = cfg, d
        set_seed(tc.seed)
        self.raw, self.reference = build_models(cfg, resume)
        self.processor = processor_for(self.raw, cfg.data.stage, cfg.data.max_text_len)
        self.sharded = tc.parallel == "fsdp" and d.world_size > 1
        # FSDP: the whole model on process 0's CPU, refreshed from the shards at each save, to write it and to
        # answer the example at the end (processes.gather_state)
        self.whole = copy.deepcopy(self.raw) if self.sharded and d.rank == 0 else None
        self.raw.to(d.device)
        if self.reference is not None:
            self.reference.to(d.device)
        if tc.gradient_checkpointing:
            self.raw.checkpoint_activations()
        # bf16 autocast (fp32 weights and optimizer); auto: on a GPU, or a CPU with avx512_bf16 and no AMX (casts.py)
        self.bf16 = use_bf16(tc.bf16, d.device) and not tc.fp16
        # fp16 autocast and a gradient scaler: asked for, or what bf16 auto takes on a GPU without bf16
        self.fp16 = tc.fp16 or (tc.bf16 == "auto" and d.device.type == "cuda" and not self.bf16)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.fp16)
        if tc.bf16 == "auto" and not self.bf16 and not self.fp16 and d.rank == 0:
            why = "has AMX tiles, where bf16 trained worse (vlm/casts.py)" if bf16_native(d.device) else (
                "has no bf16 arithmetic (emulated, it is far slower)")  # fmt: skip
            print(f"train.bf16 auto: fp32: this {d.device.type} {why}")
        if self.sharded:  # before the optimizer, which must hold the shards
            processes.shard(self.raw, self.bf16, d.device)
        self.optimizer = build_optimizer(self.raw, cfg.optim, group_of=self.raw.group_of)  # fused where all on CUDA
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.state = ckpt.TrainState(world_size=d.world_size)
        if resume is not None:
            load = partial(processes.load_optimizer, self.raw, self.optimizer) if self.sharded else None
            self.state = ckpt.load_training(resume, self.optimizer, d.rank, d.world_size, load)
            if self.fp16 and self.state.scaler is not None:
                self.scaler.load_state_dict(self.state.scaler)
        # every unused parameter (a text-only batch leaves the whole visual side idle) must be found
        self.ddp = (
            DistributedDataParallel(self.raw, find_unused_parameters=True, broadcast_buffers=False)
            if d.world_size > 1 and not self.sharded
            else None
        )
        self.model = self.ddp or self.raw
        if tc.compile:
            configure_compile()  # data-dependent sizes symbolic, so the step compiles as one graph (vlm/base.py)
            self.model = torch.compile(self.model)
        dtype = torch.float16 if self.fp16 else torch.bfloat16
        self.autocast = torch.autocast(d.device.type, dtype, enabled=self.bf16 or self.fp16)
        # the frozen weights cast to bf16 once, not at every call (casts.py), for each step's forward and backward;
        # FSDP gathers the policy's weights in bf16 itself, once per use
        self.casts = ConstantCasts([None if self.sharded else self.raw, self.reference], self.bf16)
        self.last: dict[str, Tensor] | None = None  # this process's last training micro-batch (FSDP validation)
        self.max_steps = tc.max_steps
        if tc.epochs:  # rounded up: the last step may reach into the next epoch, so all of the last one is seen
            batches = data.epoch_batches(cfg.data, self.processor, d.world_size)
            self.max_steps = math.ceil(tc.epochs * batches / tc.accumulate)
        o = cfg.optim
        self.schedule = Schedule(o.schedule, self.max_steps, o.warmup, o.target_lr, o.min_lr_ratio)
        self.stream = Stream(partial(self.loader, split="train"), d, self.state)
        self.nonfinite = 0  # steps in a row skipped for a NaN/inf loss or gradient
        self.rng = ckpt.rng_state()  # this run's RNG streams, swapped in while it works (train_together)
        self.slow = SlowSteps(d.rank == 0 and d.device.type == "cpu")

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """The process's RNGs set to this run's for the block, and this run's kept from them after it: runs that
        take turns each draw from their own streams, as if each ran alone."""
        ckpt.set_rng_state(*self.rng)
        try:
            yield
        finally:
            self.rng = ckpt.rng_state()

    def loader(self, epoch: int = 0, skip_batches: int = 0, split: str = "train") -> Iterator[dict]:
        d = self.d
        return data.make_loader(self.cfg.data, self.processor, d.rank, d.world_size, epoch, skip_batches, split)

    def losses(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The step's loss and its terms (vlm/loss.py's batch_losses)."""
        with self.autocast:
            return batch_losses(model, batch, self.raw.train_read, self.reference, self.cfg.train.dpo_beta)

    def step(self) -> dict:
        """One optimizer step over `accumulate` micro-batches; returns its log row."""
        tc, d = self.cfg.train, self.d
        lrs = self.schedule.apply(self.optimizer, self.state.step)
        start, skipped = time.perf_counter(), self.stream.skipped
        data_s, sums, samples, tokens = 0.0, {}, 0, 0  # sums: the loss and its terms over the micro-batches
        for micro in range(tc.accumulate):
            t = time.perf_counter()
            batch = self.stream.next()
            n, k = self.raw.counts(batch)
            batch = self.same_frames({key: v.to(d.device, non_blocking=True) for key, v in batch.items()})
            self.last = batch if self.sharded else None
            data_s += time.perf_counter() - t
            # FSDP reduce-scatters every micro-batch's gradients into the shards: holding whole gradients until
            # the last one would cost the memory it saves
            sync = self.ddp is None or micro == tc.accumulate - 1
            with nullcontext() if sync else self.ddp.no_sync(), self.casts:
                terms = self.losses(self.model, batch)
                self.scaler.scale(terms["loss"] / tc.accumulate).backward()  # the loss itself unless fp16
            if self.sharded:
                processes.reshard(self.raw)
            sums = {name: sums.get(name, 0.0) + value.detach().float() for name, value in terms.items()}
            samples, tokens = samples + n, tokens + k
        names = sorted(sums)  # "loss" and its terms, the same on every process
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf  # inf: measure only
        if self.fp16:  # the gradients at their own scale before they are measured and clipped
            self.scaler.unscale_(self.optimizer)
        if self.sharded:
            processes.drop_unused_grads(self.params, d)
            norm = processes.clip_grads(self.params, clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        # under fp16 a gradient that overflowed is the scaler's: it skips that step and lowers its scale
        bad = not (math.isfinite(sums["loss"].item()) and (self.fp16 or math.isfinite(norm.item())))
        *totals, samples, tokens, skipped, bad = d.sum(
            [*(sums[name].item() for name in names), samples, tokens, self.stream.skipped - skipped, bad]
        )
        means = {name: total / (tc.accumulate * d.world_size) for name, total in zip(names, totals, strict=True)}
        if bad:  # on any process: no process steps, so no NaN reaches the weights or the optimizer's moments
            if self.fp16:
                self.scaler.update()
            self.nonfinite += 1
            if self.nonfinite >= tc.max_nonfinite:
                raise NonFinite(
                    f"step {self.state.step + 1}: the loss or gradient was NaN/inf in {self.nonfinite} steps in a row "
                    f"(train.max_nonfinite); the last good checkpoint is in {tc.out_dir}: lower the learning rate "
                    "or check the data, then resume"
                )
        elif self.fp16:
            self.scaler.step(self.optimizer)  # not where the scaled gradients overflowed
            self.scaler.update()
            self.nonfinite = 0
        else:
            self.optimizer.step()
            self.nonfinite = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        seconds = time.perf_counter() - start
        return {
            "step": self.state.step,
            "epoch": self.state.epoch,
            **means,  # loss, and fine_loss / coarse_loss where the loss is their sum
            **{f"lr_{name}": lr for name, lr in lrs.items()},
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "data_s": data_s,
            "compute_s": seconds - data_s,
            "skipped": int(skipped),
            "nonfinite": int(bad > 0),
            "mix": self.mix(),
        }

    def same_frames(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """FSDP: the batch padded with invisible frames to the largest frame count of any process's batch. Under
        FSDP each use of a decoder layer gathers it (a collective), and how many LLM passes a read makes depends on
        the frame count (the foveated coarse_fine read makes none over frames at T = 0, the autoregressive one a
        pass per frame), so every process must read the same T. Padded frames change no real position's value."""
        if not self.sharded or "frame_mask" not in batch:
            return batch
        frames, mask = batch["frames"], batch["frame_mask"]
        b, t = mask.shape
        pad = self.d.max(t) - t
        if pad == 0:
            return batch
        return {
            **batch,
            "frames": torch.cat([frames, frames.new_zeros(b, pad, *frames.shape[2:])], dim=1),
            "frame_mask": torch.cat([mask, mask.new_zeros(b, pad)], dim=1),
        }

    def mix(self) -> str:
        """The realised share of each data source so far (this process), e.g. "0.860/0.140"."""
        drawn, n = self.stream.drawn, len(self.cfg.data.train)
        total = sum(drawn.values()) or 1
        return "/".join(f"{drawn[i] / total:.3f}" for i in range(n))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The loss training minimises and its terms, as val_loss, val_fine_loss, ..., each the mean over up to
        val_batches validation batches per process. DDP runs the unwrapped model with no collective inside, so a
        rank with fewer batches cannot hang the others; under FSDP every forward is collective, so the processes
        go batch by batch together and one whose batches ran out runs its last training batch, uncounted."""
        self.raw.eval()
        totals: dict[str, float] = {}
        count = 0
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            loader = self.loader(split="val")
            batches = (batch for batch in loader if batch["keys"])  # empty markers carry no sample
            for _ in range(self.cfg.train.val_batches):
                batch = next(batches, None)
                if not (self.d.sum([batch is not None])[0] if self.sharded else batch is not None):
                    break
                if batch is not None:
                    batch = {k: v.to(self.d.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
                terms = self.losses(self.raw, self.same_frames(self.last if batch is None else batch))
                if batch is not None:
                    for name, value in terms.items():
                        totals[name] = totals.get(name, 0.0) + value.item()
                    count += 1
        self.raw.train()
        names = self.loss_names
        *sums, count = self.d.sum([*(totals.get(name, 0.0) for name in names), count])
        return {f"val_{name}": total / max(count, 1) for name, total in zip(names, sums, strict=True)}

    @property
    def loss_names(self) -> list[str]:
        """The loss and the terms this run's model logs (the same on every process, whatever data it holds)."""
        config = self.raw.config
        terms = getattr(config, "coarse_weight", 0) and self.reference is None and config.mode != "coarse_only"
        return ["coarse_loss", "fine_loss", "loss"] if terms else ["loss"]

    def save(self) -> None:
        """Checkpoint (rank 0 writes, with every rank's RNG state and data position) and prune old checkpoints.
        Under FSDP the shards are gathered whole first: a checkpoint is the same whichever way it was trained."""
        local = (ckpt.rng_state(), [self.state.epoch, self.state.batches])
        gathered = [local]
        if self.d.world_size > 1:
            gathered = [None] * self.d.world_size
            dist.all_gather_object(gathered, local)
        rngs = [rng for rng, _ in gathered]
        self.state.positions = [position for _, position in gathered]  # every rank's own place in its data
        optim = None
        if self.sharded:
            weights, optim = processes.gather_state(self.raw, self.optimizer)
            if self.whole is not None:
                self.whole.load_state_dict(weights)
        self.state.scaler = self.scaler.state_dict() if self.fp16 else None
        if self.d.rank == 0:
            tc = self.cfg.train
            path = ckpt.checkpoint_dir(tc.out_dir, self.state.step)
            write = partial(saved.write_model, self.raw if self.whole is None else self.whole)
            ckpt.save_training(path, write, self.optimizer, self.state, rngs, self.cfg, optim)
            ckpt.prune_checkpoints(tc.out_dir, tc.keep_last, tc.keep_best)
        if self.d.world_size > 1:
            dist.barrier()


def train(cfg: Config) -> Path:
    """Run (or continue) the configured training; returns the directory of the final model."""
    return train_together([cfg])[0]


def train_together(cfgs: list[Config]) -> list[Path]:
    """Several runs (or their continuations) taking steps in turn in one process, each with its own model,
    optimizer, data, RNG streams, log and out_dir, so each ends as it would alone. What makes it faster than one
    after another: models that read the same batches through the same frozen backbone share that work
    (VLM.share_frozen), e.g. a run and its glance, which differ only in how they read. Returns each run's final
    model directory."""
    outs = [Path(cfg.train.out_dir) for cfg in cfgs]
    if len(set(outs)) < len(outs):
        raise ConfigError(f"runs trained together need their own train.out_dir each, got {[str(o) for o in outs]}")
    d = init_dist(cfgs[0].train.ddp_timeout)
    logs = [RunLog(cfg, enabled=d.rank == 0) for cfg in cfgs]  # fails here, before any work, if wandb is missing
    runs = []
    for cfg, out in zip(cfgs, outs, strict=True):
        resume = find_resume(cfg)
        run = Trainer(cfg, d, resume)
        if resume is not None and d.rank == 0:
            print(f"resumed from step {run.state.step} (checkpoint {resume})")
        cfg.model = run.raw.config  # the run config saved beside the model describes the model trained
        if d.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / ckpt.RUN_CONFIG)
        runs.append(run)
    for run in runs[1:]:  # the frozen work of a batch done once (and its bf16 weight copies made once)
        if run.sharded or runs[0].sharded:  # a shard holds no whole backbone to share
            continue
        if run.bf16 == runs[0].bf16 and runs[0].raw.share_frozen(run.raw, runs[0].cfg.train.accumulate):
            runs[0].casts.models += run.casts.models
            run.casts = runs[0].casts
    for run, log in zip(runs, logs, strict=True):
        log.start(run.state.step)
    named = len(runs) > 1
    bars = [
        tqdm(
            total=run.max_steps,
            initial=run.state.step,
            desc=out.name if named else None,
            position=i,
            disable=d.rank != 0,
            dynamic_ncols=True,
        )
        for i, (run, out) in enumerate(zip(runs, outs, strict=True))
    ]
    with lost_peers(d, lambda: min(run.state.step for run in runs)):
        try:  # the bars end their lines before any error is printed
            while any(run.state.step < run.max_steps for run in runs):
                for run, log, bar in zip(runs, logs, bars, strict=True):
                    if run.state.step < run.max_steps:
                        with run.own_rng():
                            take_step(run, log, bar)
        finally:
            for bar in bars:
                bar.close()
    finals = []
    for run, log, out in zip(runs, logs, outs, strict=True):
        log.close()
        final = out / "final"
        if d.rank == 0:
            last = ckpt.checkpoint_dir(out, run.state.step) / ckpt.MODEL_DIR  # saved at the last step: the same weights
            whole = run.raw if run.whole is None else run.whole  # FSDP: rank 0's whole copy, as of the last save
            write = partial(saved.link_model, last) if last.is_dir() else partial(saved.write_model, whole)
            saved.save_atomic(final, write)
            if run.cfg.data.val:
                show_example(whole, run.cfg)
        finals.append(final)
    if d.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return finals


def take_step(run: Trainer, log: RunLog, bar: tqdm) -> None:
    """One optimizer step of a run, then what follows it: validation, the log row, the bar, a checkpoint."""
    tc = run.cfg.train
    row = run.step()
    run.slow.see(run.state.step, row["compute_s"])  # the data's time varies on its own (epoch starts, media)
    if tc.val_every and run.state.step % tc.val_every == 0:
        row.update(run.validate())
    log.write(row)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}")
    if run.state.step % tc.save_every == 0 or run.state.step == run.max_steps:
        run.state.metric = row.get(tc.best_metric)
        run.save()


def show_example(model: VLM, cfg: Config) -> dict[str, str]:
    """Answer the first validation sample's question and print it beside the reference: a trained model's
    first sign of life (the seed recipes end with one)."""
    reader = open_reader(cfg.data.val[0], cfg.data.seed)
    raw = next(reader.samples(reader.units()[0], Counter()))
    question, reference = exchange(meta_of(raw))
    answerer = Answerer(model.eval())
    read = list(answerer.reads)[-1]  # the foveated model's autoregressive mode, else the one read
    try:
        state = answerer.prepare_pictures(answerer.processor.pictures(raw))
        reply = answerer.generate(state, question, read, max_new_tokens=32)
    except MediaError as e:
        reply = f"(the sample's media cannot be decoded: {e})"
    print(f"question:  {question}\nreply:     {reply or '(empty)'}\nreference: {reference}")
    return {"question": question, "reply": reply, "reference": reference}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.max_steps=10")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected failure")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.set))


if __name__ == "__main__":
    cli.run(main)
