"""Speed benchmark: prints a table of measured timings and ratios, with the device named.

    python bench.py                      # all sections, the foveated model's real architecture, random weights
    python bench.py --only inference --frames 8,64 --out bench.json
    python bench.py --only decode        # greedy decoding: dynamic vs static KV cache vs torch.compile
    python bench.py --only benchmark     # option scoring: shared encoding + prefix vs naive
    python bench.py --only frozen        # bf16 steps with frozen backbones: per-call weight casts vs casts.py's
    python bench.py --only pair          # the toy run's foveated step and glance step: DINOv2 pass each vs shared
    python bench.py --kind pixel_shuffle --only inference   # any kind of model (registry.py)
    python bench.py --suite gpu          # every GPU figure in one table, <= 8 min on one H100 (docs/speed.md)
    python bench.py --suite gpu --tiny   # the same code at tiny shapes: seconds on a CPU

Timings do not depend on weight values, so by default the backbones are the real
DINOv2-small / SmolLM2-135M architectures with random weights (`--backbones packaged` loads
the packaged ones). Ratios are measured within one run on one device; compare absolute
figures only for the same device.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import cli
import data
from config import ModelConfig
from evals.gpu_suite import SUITE_OUT, build_model, peak_bf16, random_batch, run_suite
from evals.timing import device_name, timed
from inputs.frames import FrameSpec
from inputs.processors import ChatProcessor
from vlm.base import VLM
from vlm.casts import ConstantCasts
from vlm.loss import batch_loss, token_nll
from vlm.weights import LLM_HUB_ID, load_tokenizer


def train_step_speed(
    model: VLM,
    batch: dict[str, Tensor],
    steps: int = 10,
    warmup: int = 2,
    bf16: bool = False,
    casts: ConstantCasts | None = None,
    **read: Any,
) -> dict[str, float]:
    """Training speed of forward + backward on one batch (already on the model's device), repeated.

    The optimizer step is left out: it costs the same for every read, and leaving it out keeps
    the model unchanged, so several reads can be timed on one model and one batch.
    """
    model.train()
    samples, tokens = model.counts(batch)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def step() -> None:
        with casts or nullcontext():  # forward and backward, as train.py holds it
            with autocast:
                loss = batch_loss(model, batch, read or model.train_read)
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


def _row(section: str, what: str, seconds: float, base: float, vs: str) -> dict:
    return {"section": section, "what": what, "ms": 1000 * seconds, "ratio": seconds / base, "vs": vs}


def bench_inference(
    model: VLM,
    device: torch.device,
    frame_counts: list[int],
    repeats: int,
    size: int = 224,
    prompt_len: int = 32,
) -> list[dict]:
    """Latency of [frames + prompt] in each read, and for the foveated model the query read's per-frame cost
    against a DINO pass."""
    rows = []
    ids = torch.randint(0, model.llm.config.vocab_size, (1, prompt_len), device=device)
    am = torch.ones_like(ids)
    first = next(iter(model.reads))
    for t in frame_counts:
        frames = torch.randn(1, t, 3, size, size, device=device)
        fm = torch.ones(1, t, dtype=torch.bool, device=device)
        base = None
        for name, read in model.reads.items():
            sec = timed(partial(model, frames, fm, ids, am, **read), device, repeats)
            base = base or sec
            tokens = t * model.tokens_per_frame + prompt_len
            what = f"{model.kind} {name}, {t} frames + {prompt_len} text tokens ({tokens} LLM tokens)"
            rows.append(_row("inference", what, sec, base, first))
        if model.kind == "foveated":
            pixels = frames[0]
            cache = model.encoder.encode_patches(pixels)
            queries = torch.randn(t, model.config.glimpses, model.config.query_dim, device=device)
            dino = timed(partial(model.encoder.encode_patches, pixels), device, repeats) / t
            read = timed(partial(model.encoder.query_attend, queries, cache), device, repeats) / t
            rows.append(_row("inference", f"DINO pass + patch cache, per frame ({t} batched)", dino, dino, "DINO pass"))
            rows.append(_row("inference", f"query_attend, per frame ({t} batched)", read, dino, "DINO pass"))
    return rows


def bench_decode(model: VLM, device: torch.device, repeats: int, new: int = 32, frames: int = 8) -> list[dict]:
    """Greedy decoding after a [frames + prompt] prefix, per new token: the growing KV cache against the static one
    (fixed shapes at every step) and the static one through torch.compile (CUDA graphs on a GPU). The end id is
    one no logit picks, so every run decodes `new` tokens; the prefix is in each time, and so in the ratio."""
    ids = torch.randint(0, model.llm.config.vocab_size, (1, 32), device=device)
    visual = model.prepare(torch.randn(1, frames, 3, 224, 224, device=device),
                           torch.ones(1, frames, dtype=torch.bool, device=device))  # fmt: skip
    read = next(iter(model.reads.values()))
    rows, base = [], None
    for label, kw in (("dynamic cache", {}), ("static cache", {"cache": "static"}),
                      ("static cache, torch.compile", {"cache": "static", "compile": True})):  # fmt: skip
        run = partial(model.generate, visual, ids, torch.ones_like(ids), new, -1, **kw, **read)
        sec = timed(run, device, repeats, warmup=2 if kw.get("compile") else 1) / new
        base = base or sec
        what = f"greedy decode, per token ({new} after {frames} frames + 32 text tokens), {label}"
        rows.append(_row("decode", what, sec, base, "dynamic cache"))
    return rows


def bench_benchmark(
    model: VLM,
    device: torch.device,
    repeats: int,
    questions: int = 2,
    frames: int = 8,
    options: int = 4,
    size: int = 224,
    prompt_len: int = 48,
    answer_len: int = 8,
) -> list[dict]:
    """Likelihood scoring of `options` answers in every read, per question: benchmark.py's way (encode once,
    one prefix per read, the options batched on its KV cache) vs naively re-encoding and re-running the
    full sequence for each option and read. Decoding the media is left out of both."""
    g = torch.Generator().manual_seed(0)
    vocab = model.llm.config.vocab_size
    items = [
        (
            torch.randn(1, frames, 3, size, size, generator=g).to(device),
            torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
            [torch.randint(0, vocab, (answer_len,), generator=g).tolist() for _ in range(options)],
        )
        for _ in range(questions)
    ]
    fm = torch.ones(1, frames, dtype=torch.bool, device=device)

    def shared() -> None:
        for pixels, prompt, answers in items:
            visual = model.prepare(pixels, fm)
            for read in model.reads.values():
                model.option_nll(visual, prompt, answers, answers, **read)

    def naive() -> None:
        for pixels, prompt, answers in items:
            for read in model.reads.values():
                for answer in answers:
                    ids = torch.tensor([prompt + answer], device=device)
                    labels = ids.clone()
                    labels[:, : len(prompt)] = -100
                    token_nll(model(pixels, fm, ids, torch.ones_like(ids), **read).logits, labels)

    fast = timed(shared, device, repeats) / questions
    base = timed(naive, device, repeats, warmup=0) / questions  # the same kernels, already warm: save minutes
    what = f"{options} options x {len(model.reads)} reads, {frames} frames"
    return [
        _row("benchmark", f"naive, {what} ({1 / base:.2f} q/s)", base, base, "naive"),
        _row("benchmark", f"shared, {what} ({1 / fast:.2f} q/s)", fast, base, "naive"),
    ]


def bench_train(
    model: VLM,
    device: torch.device,
    repeats: int,
    frames: int = 8,
    batch: int = 2,
    text: int = 64,
    size: int = 224,
) -> list[dict]:
    """Training forward+backward per read on one batch; on CUDA also bf16 + torch.compile and FLOP utilisation
    (FLOPs counted by torch's FlopCounterMode on the real step, not estimated)."""
    b = random_batch(model, device, frames, batch, text, size)
    variants = [("fp32", model, False)]
    if device.type == "cuda":
        variants += [("bf16", model, True), ("bf16+compile", torch.compile(model), True)]
    peak = peak_bf16(device)
    reads = {k: v for k, v in model.reads.items() if k != "autoregressive"}  # the parallel reads train
    rows, base, first = [], None, None
    for name, m, bf16 in variants:
        for read_name, read in reads.items():
            r = train_step_speed(m, b, steps=repeats, warmup=2 if "compile" in name else 1, bf16=bf16, **read)
            with FlopCounterMode(display=False) as counter:
                train_step_speed(model, b, steps=1, warmup=0, bf16=bf16, **read)
            flops = counter.get_total_flops() / r["step_s"]
            mfu = f", MFU {100 * flops / peak:.1f}%" if peak and bf16 else ""
            base, first = base or r["step_s"], first or f"fp32 {read_name}"
            what = (f"{name} {model.kind} {read_name}: {r['samples_per_s']:.2f} samples/s, "
                    f"{r['tokens_per_s']:.0f} tok/s, {flops / 1e12:.2f} TFLOP/s{mfu}")  # fmt: skip
            rows.append(_row("train", what, r["step_s"], base, first))
    model.eval()
    return rows


def backbone_params(model: VLM) -> list[Tensor]:
    """The vision and LLM weights (LoRA's frozen bases too): what the toy recipe freezes with lr 0."""
    return [p for n, p in model.named_parameters() if model.group_of(n) in ("vision", "llm", "frozen")]


def bench_frozen(
    model: VLM, device: torch.device, repeats: int, frames: int = 4, batch: int = 4, text: int = 24, size: int = 112
) -> list[dict]:
    """A bf16 training step with both backbones frozen (lr 0: the toy recipe's setting, short clips and text),
    autocast casting every frozen weight at each call against casts.py's copies made once. The same numbers."""
    b = random_batch(model, device, frames, batch, text, size)
    frozen = backbone_params(model)
    for p in frozen:
        p.requires_grad_(False)
    rows, base = [], None
    for name, casts in (("per call", None), ("once (casts.py)", ConstantCasts([model], enabled=True))):
        r = train_step_speed(model, b, steps=repeats, warmup=1, bf16=True, casts=casts)
        base = base or r["step_s"]
        what = f"bf16 {model.kind} step, backbones frozen, weights cast {name}: {r['samples_per_s']:.2f} samples/s"
        rows.append(_row("frozen", what, r["step_s"], base, "cast per call"))
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    return rows


def bench_pair(
    model: VLM, device: torch.device, repeats: int, frames: int = 4, batch: int = 4, text: int = 24, size: int = 112
) -> list[dict]:
    """A training step of the foveated model (its training read) and then of its glance (coarse_only) on the same
    batch, both backbones frozen, as the toy run trains them: each model its own frozen DINOv2 pass, against the
    glance reusing the model's (VLM.share_frozen, what train.train_together does). Every pair gets new frames,
    so the only pass reused is the model's for its glance. Foveated models only."""
    if model.kind != "foveated":
        return []
    b = random_batch(model, device, frames, batch, text, size)
    glance = copy.deepcopy(model)
    glance.config = dataclasses.replace(glance.config, mode="coarse_only")
    for m in (model, glance):
        for p in backbone_params(m):
            p.requires_grad_(False)
        m.train()
    shift = itertools.count(1)

    def pair() -> None:
        fresh = {**b, "frames": b["frames"] + 1e-3 * next(shift)}
        for m in (model, glance):
            batch_loss(m, fresh, m.train_read).backward()
            m.zero_grad(set_to_none=True)

    rows, base = [], None
    for name in ("a DINOv2 pass each", "one DINOv2 pass shared"):
        if base is not None and not model.share_frozen(glance):
            raise RuntimeError("the glance could not share the model's frozen DINOv2")
        seconds = timed(pair, device, repeats)
        base = base or seconds
        rows.append(_row("pair", f"{model.kind} step + glance step, backbones frozen, {name}", seconds, base, "each"))
    for p in backbone_params(model):
        p.requires_grad_(True)
    model.encoder.memo = None  # the glance is gone: nothing is left to share
    model.eval()
    return rows


def bench_data(workers: list[int]) -> list[dict]:
    """Data loader speed on 64-frame JPEG samples (decode + resize + normalise), per worker count."""
    processor = ChatProcessor(load_tokenizer(LLM_HUB_ID), FrameSpec(size=224, max_frames=64))
    rows = []
    for w in workers:
        r = data.throughput(processor, num_workers=w)
        what = (
            f"64-frame JPEG samples, {w} workers: {r['samples_per_s']:.2f} samples/s "
            f"({r['samples_per_s_per_worker']:.2f}/worker)"
        )
        rows.append(_row("data", what, 1 / r["samples_per_s"], 1 / r["samples_per_s"], "per sample"))
    return rows


def print_table(rows: list[dict], device: str) -> None:
    w = max([len(r["what"]) for r in rows] + [11])
    v = max([len(r["vs"]) for r in rows] + [2])
    print(f"\ndevice: {device}\n")
    print(f"| {'section':<9} | {'measurement':<{w}} | {'ms':>10} | {'ratio':>7} | {'vs':<{v}} |")
    print(f"|{'-' * 11}|{'-' * (w + 2)}|{'-' * 12}|{'-' * 9}|{'-' * (v + 2)}|")
    for r in rows:
        print(f"| {r['section']:<9} | {r['what']:<{w}} | {r['ms']:>10.2f} | {r['ratio']:>6.2f}x | {r['vs']:<{v}} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only",
        default="inference,decode,benchmark,train,frozen,pair,data",
        help="comma-separated: inference, decode, benchmark, train, frozen, pair, data",
    )
    p.add_argument("--workers", default="1,2", help="worker counts for the data section")
    p.add_argument("--frames", default="8,64", help="frame counts for the inference section")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backbones", default="random", help="random (real shapes), packaged, or a hub id / dir")
    p.add_argument("--kind", default="foveated", choices=sorted(ModelConfig.kinds), help="the kind of model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help=f"also write the rows as JSON here (--suite: default {SUITE_OUT})")
    p.add_argument("--suite", choices=["gpu"], help="gpu: every GPU figure in one table (the options above unused)")
    p.add_argument("--tiny", action="store_true", help="--suite at tiny shapes (a tiny random model): seconds on a CPU")
    args = p.parse_args(argv)
    if args.tiny and not args.suite:
        p.error("--tiny goes with --suite gpu")
    device = torch.device(args.device)
    if args.suite:
        run_suite(device, args.tiny, args.out or SUITE_OUT)
        return
    model = build_model(args.kind, args.backbones).to(device).eval()
    rows: list[dict] = []
    with torch.inference_mode():
        if "inference" in args.only.split(","):
            rows += bench_inference(model, device, [int(t) for t in args.frames.split(",")], args.repeats)
        if "decode" in args.only.split(","):
            rows += bench_decode(model, device, args.repeats)
        if "benchmark" in args.only.split(","):
            rows += bench_benchmark(model, device, args.repeats)
    if "train" in args.only.split(","):
        rows += bench_train(model, device, args.repeats)
    if "frozen" in args.only.split(","):
        rows += bench_frozen(model, device, args.repeats)
    if "pair" in args.only.split(","):
        rows += bench_pair(model, device, args.repeats)
    if "data" in args.only.split(","):
        rows += bench_data([int(w) for w in args.workers.split(",")])
    name = device_name(device)
    print_table(rows, name)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    cli.run(main)
