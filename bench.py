"""Speed benchmark: prints a table of measured timings and ratios, with the device named.

    python bench.py                      # all sections, real architectures with random weights
    python bench.py --only inference --frames 8,64 --out bench.json
    python bench.py --only benchmark     # option scoring: shared encoding + prefix vs naive

Timings do not depend on weight values, so by default the backbones are the real
DINOv2-small / SmolLM2-135M architectures with random weights (`--backbones packaged` loads
the packaged ones). Ratios are measured within one run on one device; compare absolute
figures only for the same device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

import data
from adapters import option_nll
from config import ModelConfig
from model import MODES, FoveatedVLM, token_nll
from train import throughput
from weights import DINOV2_SMALL, LLM_HUB_ID, load_tokenizer

# SmolLM2-135M's shape, for weight-free timing (DINOv2-small's comes from weights.py)
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn` over `repeats` runs after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(backbones: str) -> FoveatedVLM:
    if backbones == "random":
        torch.manual_seed(0)
        dino = Dinov2Model(Dinov2Config(**DINOV2_SMALL))
        llm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
        return FoveatedVLM(ModelConfig(dino="random", llm="random"), dino, llm)
    return FoveatedVLM.from_backbones(ModelConfig(dino=backbones, llm=backbones))


def bench_inference(
    model: FoveatedVLM,
    device: torch.device,
    frame_counts: list[int],
    repeats: int,
    size: int = 224,
    prompt_len: int = 32,
) -> list[dict]:
    """Latency of [frames + prompt] through each mode, and the query read's per-frame cost vs DINO's."""
    rows = []
    ids = torch.randint(0, model.llm.config.vocab_size, (1, prompt_len), device=device)
    am = torch.ones_like(ids)
    for t in frame_counts:
        frames = torch.randn(1, t, 3, size, size, device=device)
        fm = torch.ones(1, t, dtype=torch.bool, device=device)
        base = None
        for mode in MODES:
            sec = timed(partial(model, frames, fm, ids, am, mode=mode), device, repeats)
            base = base or sec
            rows.append(
                {
                    "section": "inference",
                    "what": f"{mode}, {t} frames + {prompt_len} text tokens",
                    "ms": 1000 * sec,
                    "ratio": sec / base,
                    "vs": "coarse_only",
                }
            )
        pixels = frames[0]
        cache = model.encoder.encode_patches(pixels)
        queries = torch.randn(t, model.config.glimpses, model.config.query_dim, device=device)
        dino = timed(partial(model.encoder.encode_patches, pixels), device, repeats) / t
        read = timed(partial(model.encoder.query_attend, queries, cache), device, repeats) / t
        rows.append(
            {
                "section": "inference",
                "what": f"DINO pass + patch cache, per frame ({t} batched)",
                "ms": 1000 * dino,
                "ratio": 1.0,
                "vs": "DINO pass",
            }
        )
        rows.append(
            {
                "section": "inference",
                "what": f"query_attend, per frame ({t} batched)",
                "ms": 1000 * read,
                "ratio": read / dino,
                "vs": "DINO pass",
            }
        )
    return rows


def bench_benchmark(
    model: FoveatedVLM,
    device: torch.device,
    repeats: int,
    questions: int = 2,
    frames: int = 8,
    options: int = 4,
    size: int = 224,
    prompt_len: int = 48,
    answer_len: int = 8,
) -> list[dict]:
    """Likelihood scoring of `options` answers in every mode, per question: benchmark.py's way (encode once,
    one prefix per mode, the options batched on its KV cache) vs naively re-encoding and re-running the
    full sequence for each option and mode. Decoding the media is left out of both."""
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
            cache = model.encode(pixels, fm)
            for mode in MODES:
                option_nll(model, cache, fm, prompt, answers, answers, mode)

    def naive() -> None:
        for pixels, prompt, answers in items:
            for mode in MODES:
                for answer in answers:
                    ids = torch.tensor([prompt + answer], device=device)
                    labels = ids.clone()
                    labels[:, : len(prompt)] = -100
                    token_nll(model(pixels, fm, ids, torch.ones_like(ids), mode=mode).logits, labels)

    fast = timed(shared, device, repeats) / questions
    base = timed(naive, device, repeats, warmup=0) / questions  # the same kernels, already warm: save minutes
    what = f"{options} options x {len(MODES)} modes, {frames} frames"
    return [
        {"section": "benchmark", "what": f"naive, {what} ({1 / base:.2f} q/s)", "ms": 1000 * base,
         "ratio": 1.0, "vs": "naive"},
        {"section": "benchmark", "what": f"shared, {what} ({1 / fast:.2f} q/s)", "ms": 1000 * fast,
         "ratio": fast / base, "vs": "naive"},
    ]  # fmt: skip


# dense bf16 peak FLOP/s, for FLOP utilisation on the GPUs this project meets
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def bench_train(
    model: FoveatedVLM,
    device: torch.device,
    repeats: int,
    frames: int = 8,
    batch: int = 2,
    text: int = 64,
    size: int = 224,
) -> list[dict]:
    """Training forward+backward per mode on one batch; on CUDA also bf16 + torch.compile and FLOP utilisation
    (FLOPs counted by torch's FlopCounterMode on the real step, not estimated)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.llm.config.vocab_size, (batch, text), generator=g)
    b = {
        "frames": torch.randn(batch, frames, 3, size, size, generator=g),
        "frame_mask": torch.ones(batch, frames, dtype=torch.bool),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
    }
    b = {k: v.to(device) for k, v in b.items()}
    variants = [("fp32", model, False)]
    if device.type == "cuda":
        variants += [("bf16", model, True), ("bf16+compile", torch.compile(model), True)]
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in device_name(device)), None)
    rows, base = [], None
    for name, m, bf16 in variants:
        for mode in ("coarse_only", "coarse_fine"):
            r = throughput(m, b, mode, steps=repeats, warmup=2 if "compile" in name else 1, bf16=bf16)
            with FlopCounterMode(display=False) as counter:
                throughput(model, b, mode, steps=1, warmup=0, bf16=bf16)
            flops = counter.get_total_flops() / r["step_s"]
            mfu = f", MFU {100 * flops / peak:.1f}%" if peak and bf16 else ""
            base = base or r["step_s"]
            rows.append(
                {
                    "section": "train",
                    "what": f"{name} {mode}: {r['samples_per_s']:.2f} samples/s, "
                    f"{r['tokens_per_s']:.0f} tok/s, {flops / 1e12:.2f} TFLOP/s{mfu}",
                    "ms": 1000 * r["step_s"],
                    "ratio": r["step_s"] / base,
                    "vs": "fp32 coarse_only",
                }
            )
    model.eval()
    return rows


def bench_data(workers: list[int]) -> list[dict]:
    """Data loader speed on 64-frame JPEG samples (decode + resize + normalise), per worker count."""
    tokenizer = load_tokenizer(LLM_HUB_ID)
    rows = []
    for w in workers:
        r = data.throughput(tokenizer, num_workers=w)
        rows.append(
            {
                "section": "data",
                "what": f"64-frame JPEG samples, {w} workers: "
                f"{r['samples_per_s']:.2f} samples/s ({r['samples_per_s_per_worker']:.2f}/worker)",
                "ms": 1000 / r["samples_per_s"],
                "ratio": 1.0,
                "vs": "per sample",
            }
        )
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
        "--only", default="inference,benchmark,train,data", help="comma-separated: inference, benchmark, train, data"
    )
    p.add_argument("--workers", default="1,2", help="worker counts for the data section")
    p.add_argument("--frames", default="8,64", help="frame counts for the inference section")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backbones", default="random", help="random (real shapes), packaged, or a hub id / dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args.backbones).to(device).eval()
    rows: list[dict] = []
    with torch.inference_mode():
        if "inference" in args.only.split(","):
            rows += bench_inference(model, device, [int(t) for t in args.frames.split(",")], args.repeats)
        if "benchmark" in args.only.split(","):
            rows += bench_benchmark(model, device, args.repeats)
    if "train" in args.only.split(","):
        rows += bench_train(model, device, args.repeats)
    if "data" in args.only.split(","):
        rows += bench_data([int(w) for w in args.workers.split(",")])
    name = device_name(device)
    print_table(rows, name)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
