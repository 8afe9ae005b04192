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
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

from adapters import option_nll
from config import ModelConfig
from model import MODES, FoveatedVLM, token_nll
from weights import DINOV2_SMALL

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
    data = [
        (
            torch.randn(1, frames, 3, size, size, generator=g).to(device),
            torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
            [torch.randint(0, vocab, (answer_len,), generator=g).tolist() for _ in range(options)],
        )
        for _ in range(questions)
    ]
    fm = torch.ones(1, frames, dtype=torch.bool, device=device)

    def shared() -> None:
        for pixels, prompt, answers in data:
            cache = model.encode(pixels, fm)
            for mode in MODES:
                option_nll(model, cache, fm, prompt, answers, answers, mode)

    def naive() -> None:
        for pixels, prompt, answers in data:
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


def print_table(rows: list[dict], device: str) -> None:
    print(f"\ndevice: {device}\n")
    print(f"| {'section':<10} | {'measurement':<52} | {'ms':>10} | {'ratio':>7} | {'vs':<12} |")
    print(f"|{'-' * 12}|{'-' * 54}|{'-' * 12}|{'-' * 9}|{'-' * 14}|")
    for r in rows:
        print(f"| {r['section']:<10} | {r['what']:<52} | {r['ms']:>10.2f} | {r['ratio']:>6.2f}x | {r['vs']:<12} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="inference,benchmark", help="comma-separated sections: inference, benchmark")
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
    name = device_name(device)
    print_table(rows, name)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
