"""The GPU suite behind `python bench.py --suite gpu [--tiny]`: one device script that measures every GPU figure
(training per read with its FLOPs and MFU, the loader, latency, decoding) into one table, as a GPU is lent for minutes
at a time (docs/speed.md); `--tiny` runs the same code at tiny shapes on a CPU. bench.py's speed tables take their
model builder, random batch and bf16 peaks from here."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stderr
from functools import partial
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch import Tensor, nn
from transformers import Dinov2Config, LlamaConfig

import cli
import data
import registry
from config import DataConfig, ModelConfig, OptimConfig, ShardSource
from evals.timing import device_name, timed
from inputs.frames import FrameSpec
from inputs.processors import ChatProcessor
from layouts import shardwriter
from training.optim import build_optimizer
from vlm.base import VLM
from vlm.casts import ConstantCasts, bf16_native
from vlm.loss import batch_loss
from vlm.weights import DINOV2_SMALL, PACKAGED, load_tokenizer

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


def build_model(kind: str = "foveated", backbones: str = "random") -> VLM:
    """A model of `kind` on DINOv2-small + SmolLM2-135M: random weights of the real shapes, or loaded ones."""
    config = ModelConfig.kinds[kind]()
    if backbones == "random":
        torch.manual_seed(0)
        shapes = {
            "dino": Dinov2Config(**DINOV2_SMALL).to_dict(),
            "tower": {"family": "dinov2", "config": Dinov2Config(**DINOV2_SMALL).to_dict()},
            "llm": LlamaConfig(**SMOLLM2_135M).to_dict(),
        }
        return registry.model_class(kind).from_configs(config, shapes, None, FrameSpec())
    for key in ("dino", "tower", "llm"):
        if hasattr(config, key):
            setattr(config, key, backbones)
    return registry.new_model(config)


# dense bf16 peak FLOP/s of the GPUs this project meets, by a part of the device's name, the most specific first
# (the SXM H100 calls itself "NVIDIA H100 80GB HBM3"); FLOP utilisation is against these
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_bf16(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None (a CPU, or a GPU not in PEAK_BF16)."""
    return peak_of(device_name(device)) if device.type == "cuda" else None


def peak_of(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called `name` (as torch names it), or None when it is not in PEAK_BF16."""
    return next((v for k, v in PEAK_BF16 if k in name), None)


def random_batch(model: VLM, device: torch.device, frames: int, batch: int, text: int, size: int) -> dict[str, Tensor]:
    """A seeded batch of random frames and text, every token labelled, on `device`."""
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
    return b


# ---- the GPU suite: every GPU figure of the issue in one run and one table ----------------------------------------

SUITE_OUT = Path("runs/bench/gpu_suite.json")  # and gpu_suite.md beside it
SUITE_COLUMNS = ("section", "measurement", "frames", "ms", "ratio", "samples/s", "tokens/s", "frames/s", "TFLOP/s",
                 "MFU %", "peak GiB", "note")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SuiteShapes:
    """The sizes one suite run measures at."""

    size: int  # frame side, px
    read_frames: tuple[int, ...]  # clip lengths of the latency rows (batch 1); the decode rows use the first
    prompt: int  # prompt tokens after the frames
    answer: int  # greedy tokens of a latency row's answer
    decode: int  # greedy tokens of a decode row
    train_frames: tuple[int, ...]  # clip lengths of the training rows
    batch: int  # clips per training step
    text: int  # text tokens per clip in training, every one labelled
    repeats: int  # timed runs per row (the median), after the warm-up
    clip: tuple[int, int, int, int]  # the loader's source videos: width, height, frames, fps
    samples: int  # loader samples per measurement (of max(train_frames) frames each)
    workers: tuple[int, ...]  # loader worker counts
    budget_s: float  # a row starts only this long after the suite did; later ones are noted as skipped


# prompt 48: every static cache of the latency and decode rows falls in the 128-slot bucket (kvcache.slots_for), so
# the decode step is compiled and its CUDA graph recorded once
GPU_SHAPES = SuiteShapes(size=224, read_frames=(8, 64), prompt=48, answer=16, decode=32, train_frames=(8, 16, 64),
                         batch=8, text=64, repeats=5, clip=(480, 270, 120, 30), samples=24, workers=(1, 4),
                         budget_s=400.0)  # fmt: skip
TINY_SHAPES = SuiteShapes(size=16, read_frames=(2, 4), prompt=6, answer=3, decode=16, train_frames=(2, 3, 4), batch=2,
                          text=8, repeats=1, clip=(32, 24, 12, 12), samples=4, workers=(1, 2),
                          budget_s=600.0)  # fmt: skip
# the tiny model: a 2-layer DINOv2 of 16-px frames (4-px patches) and a 2-layer Llama
TINY_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4, image_size=16)
TINY_LLM = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


def suite_model(tiny: bool) -> tuple[VLM, str]:
    """The foveated model on the packaged DINOv2-small and SmolLM2-135M (no network), or a tiny random one; and
    what it is. Without the packaged weights the real shapes get random weights (timings do not depend on them)."""
    if not tiny:
        try:
            return build_model("foveated", PACKAGED), "foveated, packaged DINOv2-small + SmolLM2-135M"
        except FileNotFoundError as e:
            print(f"bench.py: {e}; timing random weights of the same shapes instead", flush=True)
            return build_model("foveated", "random"), "foveated, DINOv2-small + SmolLM2-135M shapes, random weights"
    torch.manual_seed(0)
    config = ModelConfig.kinds["foveated"](dino="tiny", llm="tiny", query_dim=16)
    shapes = {"dino": Dinov2Config(**TINY_DINO).to_dict(), "llm": LlamaConfig(**TINY_LLM).to_dict()}
    model = registry.model_class("foveated").from_configs(config, shapes, None, FrameSpec(size=16, max_frames=8))
    return model, "foveated, tiny random"


def linear_weights(module: nn.Module, only: tuple[str, ...] = ()) -> int:
    """The weights of `module`'s Linear layers (those whose name holds one of `only`, if given): the multiply-adds
    one token costs through them."""
    return sum(m.weight.numel() for n, m in module.named_modules()
               if isinstance(m, nn.Linear) and (not only or any(o in n for o in only)))  # fmt: skip


def _trains(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def foveated_flops(model: VLM, batch: int, frames: int, text: int, size: int, mode: str, train: bool = True) -> float:
    """FLOPs of one step of the foveated model over `batch` clips of `frames` real frames of `size` px and `text`
    labelled text tokens, counted from the real shapes as 2 x weights x tokens for each part's forward (attention
    scores left out), plus, in training, 4 x where the part's weights train (the gradients of weights and inputs)
    or 2 x where only its inputs need one (a trained part below it): the DINOv2 patch pass takes a backward only
    where DINOv2 trains; coarse_fine reads every frame twice (the coarse read, then `fine_passes` fine ones) and
    runs the LLM over the frames once more per fine read; the coarse loss (`coarse_weight`) adds its LLM pass.
    With everything training this is torch's FlopCounterMode's count of the step's dense matmuls (to 0.1 %); with
    frozen backbones it may count a few backward matmuls that autograd skips (the autoregressive step's)."""
    cfg, enc = model.config, model.encoder
    dino, k, n = enc.dino, cfg.glimpses, batch * frames
    patches = (size // dino.config.patch_size) ** 2
    conv = dino.embeddings.patch_embeddings.projection.weight.numel()
    full = [linear_weights(layer) for layer in dino.encoder.layer]  # each layer's projections and MLP
    kv = [linear_weights(layer, ("k_proj", "v_proj")) for layer in dino.encoder.layer]
    # the deep read needs only the keys and values of the last layer's patches (encoder.py); a query runs through
    # every layer but makes no key or value (it attends to the patches' cached ones)
    patch = sum(full[:-1]) + kv[-1] if enc.deep else sum(full)
    through = sum(full) - sum(kv) if enc.deep else 0
    parts = [m for name, m in enc.named_children() if name != "dino"]  # the read's own layers (query in/out, ...)
    own = sum(linear_weights(m) for m in parts)
    aux = cfg.coarse_weight > 0 and mode != "coarse_only"
    fine = cfg.fine_passes if mode == "coarse_fine" else 0
    reads = 1 + fine + (aux and mode == "autoregressive")
    written = batch * (frames - 1) * k * (fine or (mode == "autoregressive"))  # queries the LLM writes, frame 1 on
    llm_tokens = batch * (frames * k + text) * (1 + (aux and mode == "autoregressive"))
    llm_tokens += fine * n * k + (aux and mode == "coarse_fine") * batch * text  # pass 1 (with the text, for aux)
    labelled = batch * text * (1 + aux)
    vision, llm, query = _trains(dino), _trains(model.llm), _trains(enc) or model.q_static.requires_grad

    def times(weights: bool, inputs: bool) -> int:
        return 1 if not train else 3 if weights else 2 if inputs else 1

    hidden = model.llm.config.hidden_size
    return 2.0 * sum((
        n * conv * patches * (2 if train and vision else 1),  # the pixels take no gradient: the weights' alone
        n * patch * (1 + patches) * times(vision, False),
        n * k * reads * through * times(vision, query),
        n * k * reads * own * times(_trains(*parts), query),
        n * k * reads * linear_weights(model.dino_to_llm) * times(_trains(model.dino_to_llm), query),
        written * linear_weights(model.llm_to_query) * times(_trains(model.llm_to_query), True),
        llm_tokens * linear_weights(model.decoder()) * times(llm, True),
        labelled * model.llm.config.vocab_size * hidden * times(llm, True),  # the output layer, labelled tokens only
    ))  # fmt: skip


class Suite:
    """The suite's rows, each measured only while its time budget lasts; one that fails or runs out of memory is
    a note in the table, not the end of the run (a GPU is lent for minutes). Rows are printed as they come and the
    files rewritten after each, so a run cut short still leaves what it measured."""

    def __init__(self, device: torch.device, shapes: SuiteShapes, header: dict, out: Path, start: float) -> None:
        self.device, self.shapes, self.header, self.out = device, shapes, header, out
        self.rows: list[dict] = []
        self.start = start  # time.monotonic() when the suite began

    def measure(self, section: str, measurement: str, frames: int | None, fn: Callable[[], dict]) -> dict:
        row: dict[str, Any] = dict.fromkeys(SUITE_COLUMNS)
        row.update(section=section, measurement=measurement, frames=frames, note="")
        cuda = self.device.type == "cuda"
        if time.monotonic() - self.start > self.shapes.budget_s:
            row["note"] = "skipped: the time budget is spent"
        else:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                row.update(fn())
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
            except Exception as e:  # noqa: BLE001 (one row's failure is reported in its row)
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if cuda:
                row["peak GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                torch.cuda.empty_cache()
        self.rows.append(row)
        print(f"  {section}: {measurement}, {frames} frames: {_cells(row)}", flush=True)
        self.write()
        return row

    def find(self, section: str, measurement: str, frames: int | None) -> dict | None:
        """The row measured so far under these names, if any."""
        key = (section, measurement, frames)
        return next((r for r in self.rows if (r["section"], r["measurement"], r["frames"]) == key), None)

    def timed_row(self, fn: Callable[[], object], warmup: int, base: dict | None) -> dict:
        """ms of `fn` (the median of the shapes' repeats) and its ratio to the `base` row (None: it is the base)."""
        ms = 1000 * timed(fn, self.device, self.shapes.repeats, warmup)
        return {"ms": ms, "ratio": _ratio(ms, base)}

    def write(self) -> None:
        self.header["seconds"] = round(time.monotonic() - self.start, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.header, "columns": SUITE_COLUMNS, "rows": self.rows}, indent=1) + "\n")
        self.out.with_suffix(".md").write_text(suite_markdown(self.header, self.rows))


def _ratio(ms: float, base: dict | None) -> float | None:
    """ms over the base row's (1 for a row that is its own base; none when the base row failed)."""
    return 1.0 if base is None else ms / base["ms"] if base["ms"] else None


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if column == "ratio":
        return f"{value:.2f}x"
    if column in ("ms", "peak GiB", "TFLOP/s"):
        return f"{value:.2f}"
    if column == "MFU %":
        return f"{value:.1f}"
    return f"{value:.0f}" if isinstance(value, int) or value >= 100 else f"{value:.2f}"


def _cells(row: dict) -> str:
    return ", ".join(f"{c} {_fmt(c, row[c])}" for c in SUITE_COLUMNS[3:] if row[c] not in (None, ""))


def suite_markdown(header: dict, rows: list[dict]) -> str:
    """The header as a list, then one table of every row (SUITE_COLUMNS)."""
    lines = [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(SUITE_COLUMNS) + " |", "|" + "---|" * len(SUITE_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(c, r[c]) for c in SUITE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def suite_latency(suite: Suite, model: VLM, compiled: bool, casts: ConstantCasts) -> None:
    """Per read, at batch 1: the read itself (the forward over [frames, prompt], what likelihood scoring pays) and an
    answer (the read and `answer` greedy tokens), eager on the growing KV cache and on generate's static cache
    (torch.compile'd decode steps: CUDA graphs on a GPU). Ratio: against coarse_only's row of the same kind."""
    sh, device = suite.shapes, suite.device
    ids = torch.randint(0, model.llm.config.vocab_size, (1, sh.prompt), device=device)
    am = torch.ones_like(ids)
    static = "static cache + compile" if compiled else "static cache (compiled on a GPU only)"
    with torch.inference_mode(), casts, torch.autocast(device.type, torch.bfloat16, enabled=casts.enabled):
        for t in sh.read_frames:
            frames = torch.randn(1, t, 3, sh.size, sh.size, device=device)
            fm = torch.ones(1, t, dtype=torch.bool, device=device)
            for name, read in model.reads.items():
                cached = {"cache": "static", "compile": compiled}
                runs = (
                    ("read, eager", partial(model, frames, fm, ids, am, **read), 1),
                    (f"read + {sh.answer} tokens, eager", partial(_answer, model, frames, fm, ids, {}, sh, read), 1),
                    (f"read + {sh.answer} tokens, {static}", partial(_answer, model, frames, fm, ids, cached, sh, read),
                     3 if compiled else 1),  # compiling, then recording the CUDA graph
                )  # fmt: skip
                for what, fn, warmup in runs:
                    base = suite.find("latency", f"coarse_only {what}", t)
                    suite.measure("latency", f"{name} {what}", t, partial(suite.timed_row, fn, warmup, base))


def _answer(model: VLM, frames: Tensor, fm: Tensor, ids: Tensor, cache: dict, sh: SuiteShapes, read: dict) -> Tensor:
    """Encode, read and greedily write `sh.answer` tokens (the end id -1 is never picked)."""
    return model.generate(model.prepare(frames, fm), ids, torch.ones_like(ids), sh.answer, -1, **cache, **read)


def suite_decode(suite: Suite, model: VLM, compiled: bool, casts: ConstantCasts) -> None:
    """Greedy decoding per token after a [frames, prompt] prefix (the first read): the growing KV cache, the static
    one, and the static one with torch.compile'd steps (CUDA graphs on a GPU). Per token = (time of 2n tokens - time
    of n) / n, so the prefix cancels out (both lengths fall in one cache bucket). Ratio: against the growing cache."""
    sh, device = suite.shapes, suite.device
    t, n = sh.read_frames[0], sh.decode
    ids = torch.randint(0, model.llm.config.vocab_size, (1, sh.prompt), device=device)
    am = torch.ones_like(ids)
    read = next(iter(model.reads.values()))
    variants = [("dynamic cache", {}), ("static cache", {"cache": "static"})]
    variants += [("static cache + compile", {"cache": "static", "compile": True})] if compiled else []
    with torch.inference_mode(), casts, torch.autocast(device.type, torch.bfloat16, enabled=casts.enabled):
        visual = model.prepare(torch.randn(1, t, 3, sh.size, sh.size, device=device),
                               torch.ones(1, t, dtype=torch.bool, device=device))  # fmt: skip
        for label, kw in variants:
            base = suite.find("decode", "greedy, per token, dynamic cache", t)
            warmup = 3 if kw.get("compile") else 1
            runs = [partial(model.generate, visual, ids, am, m, -1, **kw, **read) for m in (n, 2 * n)]
            suite.measure("decode", f"greedy, per token, {label}", t, partial(_per_token, suite, runs, n, warmup, base))


def _per_token(suite: Suite, runs: list[Callable], n: int, warmup: int, base: dict | None) -> dict:
    """ms per token from the times of n and 2n tokens."""
    one, two = (timed(run, suite.device, suite.shapes.repeats, warmup) for run in runs)
    ms = 1000 * (two - one) / n
    return {"ms": ms, "ratio": _ratio(ms, base), "tokens/s": 1000 / ms if ms > 0 else None}


def suite_train(suite: Suite, model: VLM, bf16: bool) -> None:
    """A whole training step per mode (forward, backward, clipping, AdamW: fused on CUDA) with every part training
    (stage 1 with both backbones), on `batch` clips and `text` labelled tokens each: samples/s, LLM tokens/s,
    model TFLOP/s (`foveated_flops`) and the fraction of the GPU's dense bf16 peak. Ratio: against coarse_only."""
    sh, device = suite.shapes, suite.device
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # put back after: the reads run on the loaded
    opt = build_optimizer(model, OptimConfig())  # all three groups at their default rates: everything trains
    params = [p for g in opt.param_groups for p in g["params"]]
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    model.train()
    for t in sh.train_frames:
        batch = random_batch(model, device, t, sh.batch, sh.text, sh.size)
        for name, read in model.reads.items():
            step = partial(_train_step, model, batch, read, opt, params, autocast)
            base = suite.find("train", "coarse_only step", t)
            suite.measure("train", f"{name} step", t, partial(_train_row, suite, model, batch, step, name, opt, base))
    model.eval()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(weights)


def _train_step(
    model: VLM,
    batch: dict[str, Tensor],
    read: dict,
    opt: torch.optim.Optimizer,
    params: list[Tensor],
    autocast: torch.autocast,
) -> None:
    """One optimizer step as train.py takes it: the loss under autocast, backward, clipping at 1, AdamW."""
    with autocast:
        loss = batch_loss(model, batch, read)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _train_row(
    suite: Suite,
    model: VLM,
    batch: dict[str, Tensor],
    step: Callable[[], None],
    mode: str,
    opt: torch.optim.Optimizer,
    base: dict | None,
) -> dict:
    sh = suite.shapes
    samples, tokens = model.counts(batch)
    t = batch["frames"].shape[1]
    try:
        sec = timed(step, suite.device, sh.repeats, warmup=2)
    finally:  # out of memory half-way: no gradient is left to hold the memory
        opt.zero_grad(set_to_none=True)
    flops = foveated_flops(model, sh.batch, t, sh.text, sh.size, mode) / sec
    peak = peak_bf16(suite.device)
    return {
        "ms": 1000 * sec,
        "ratio": _ratio(1000 * sec, base),
        "samples/s": samples / sec,
        "tokens/s": tokens / sec,
        "frames/s": samples * t / sec,
        "TFLOP/s": flops / 1e12,
        "MFU %": 100 * flops / peak if peak else "n/a",
    }


def write_clip(path: Path, width: int, height: int, frames: int, fps: int, seed: int) -> None:
    """An MPEG-4 clip of a noisy scene panning sideways (decoding cost, not content, is what is measured)."""
    rng = np.random.default_rng(seed)
    scene = np.linspace(0, 200, width)[None, :, None] + rng.integers(0, 56, (height, width, 3))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = np.roll(scene, 3 * i, axis=1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def suite_loader(suite: Suite) -> None:
    """The training loader (data.py, the chat processor at the suite's frame size) over samples of max(train_frames)
    frames: mp4 clips decoded by frames.py's video reader, and the same clips converted by the shard writer into
    JPEG frames (prepare.py's --frame-size/--max-frames), both as shards the shard writer made in a temp dir.
    Rates are from the first batch's arrival to the last (worker start-up left out), frames/s per worker; the note
    says how many workers keep up with the fastest training step measured at that clip length."""
    sh = suite.shapes
    t = max(sh.train_frames)
    steps = [r for r in suite.rows if r["section"] == "train" and r["frames"] == t and r["frames/s"]]
    fastest = max(steps, key=lambda r: r["frames/s"], default=None)
    shards = {
        "mp4": shardwriter.Options(shard_size=max(1, sh.samples // 4)),
        "jpeg": shardwriter.Options(shard_size=max(1, sh.samples // 4), frame_size=sh.size, max_frames=t),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:  # what every row needs; a failure here is each row's note, not the suite's end
            processor = ChatProcessor(load_tokenizer(PACKAGED), FrameSpec(size=sh.size, max_frames=t), stage=1)
            _write_shards(root, sh, shards)
            ready = None
        except Exception as e:  # noqa: BLE001
            ready = e
        for kind in shards:
            for w in sh.workers:
                cfg = DataConfig(train=[ShardSource(path=str(root / kind / "*.tar"))], batch_size=1, num_workers=w,
                                 shuffle_buffer=0, max_frames=t, frame_size=sh.size)  # fmt: skip
                what = f"{kind}, {w} worker{'s' if w > 1 else ''}, per worker"
                row = partial(_raise, ready) if ready else partial(_loader_row, cfg, processor, sh.samples * t, fastest)
                suite.measure("loader", what, t, row)


def _raise(error: Exception) -> dict:
    raise error


def _write_shards(root: Path, sh: SuiteShapes, shards: dict[str, shardwriter.Options]) -> None:
    """`sh.samples` clips in an OpenVid-layout CSV, converted by the shard writer into root/KIND/*.tar per option."""
    (root / "videos").mkdir()
    with open(root / "clips.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["video", "caption"])
        for i in range(sh.samples):
            write_clip(root / "videos" / f"clip{i:03d}.mp4", *sh.clip, seed=i)
            rows.writerow([f"clip{i:03d}.mp4", f"a panning view, number {i}"])
    for kind, options in shards.items():
        with redirect_stderr(io.StringIO()):  # the writer's progress bar
            shardwriter.convert("openvid", root / "clips.csv", root / "videos", root / kind, options)


def _loader_row(cfg: DataConfig, processor: Any, frames: int, fastest: dict | None) -> dict:
    arrived, got = [], 0
    for batch in data.make_loader(cfg, processor):
        if batch["keys"]:
            arrived.append(time.perf_counter())
            got += int(batch["frame_mask"].sum())
    if got != frames or len(arrived) < 2:
        raise RuntimeError(f"the loader gave {got} frames in {len(arrived)} samples, not {frames}")
    sec, per_sample = arrived[-1] - arrived[0], got // len(arrived)
    per_worker = (got - per_sample) / sec / max(cfg.num_workers, 1)
    row = {"ms": 1000 * sec / (len(arrived) - 1), "samples/s": (len(arrived) - 1) / sec, "frames/s": per_worker}
    if fastest is not None:
        row["note"] = (f"{fastest['frames/s'] / per_worker:.1f} workers feed the fastest step at {per_sample} frames "
                       f"({fastest['measurement']}, {fastest['frames/s']:.0f} frames/s)")  # fmt: skip
    return row


def run_suite(device: torch.device, tiny: bool, out: Path, compiled: bool | None = None) -> list[dict]:
    """Every GPU figure in one table (see docs/speed.md): latency per read, decoding, training per mode and the
    loader; `tiny` runs the same code on tiny shapes (a CPU test). `compiled` (default: on CUDA) compiles the decode
    steps. Writes `out` (JSON) and the same table as markdown beside it; returns the rows."""
    start = time.monotonic()
    if device.type != "cuda" and not tiny:
        raise cli.UserError("--suite gpu at the real shapes needs a CUDA device (a CPU would take hours): add --tiny")
    shapes = TINY_SHAPES if tiny else GPU_SHAPES
    compiled = device.type == "cuda" if compiled is None else compiled
    bf16 = device.type == "cuda" and bf16_native(device)
    peak = peak_bf16(device)
    header = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": "",
        "precision": "bf16 autocast (fp32 weights)" if bf16 else "fp32",
        "dense bf16 peak TFLOP/s": peak / 1e12 if peak else "n/a",
    }
    print(f"bench.py --suite gpu{' --tiny' if tiny else ''}: {header['device']}, torch {header['torch']}, "
          f"CUDA {header['cuda']}", flush=True)  # fmt: skip
    model, header["model"] = suite_model(tiny)
    model = model.to(device).eval()
    suite = Suite(device, shapes, header, out, start)
    # training and the loader first: the decode step's compilation (a minute on a GPU) comes last in the budget
    suite_train(suite, model, bf16)
    suite_loader(suite)
    casts = ConstantCasts([model], bf16, constant="all")  # inference's weights cast once (evals/answering.py) and
    suite_latency(suite, model, compiled, casts)  # held by both sections: one CUDA graph for both
    suite_decode(suite, model, compiled, casts)
    suite.write()
    print("\n" + suite_markdown(header, suite.rows))
    print(f"written: {out} and {out.with_suffix('.md')}")
    return suite.rows
