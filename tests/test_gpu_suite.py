"""Ready for a GPU that comes for minutes: `bench.py --suite gpu` (evals/gpu_suite.py) runs end to end at tiny
shapes on the CPU and writes its one table (every row and column it promises, each figure consistent with the
others); the FLOPs behind its MFU column equal torch's count of the step's dense matmuls; the GPU peaks are found by
torch's device names. And the optimizer's GPU options (training/optim.py): fused AdamW only where every trained
parameter is on CUDA, 8-bit AdamW refused in one line off CUDA."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from cli import UserError
from config import ConfigError, OptimConfig
from evals import gpu_suite
from tests.tiny import tiny_model
from training import optim
from training.optim import build_optimizer, fused_on
from vlm.loss import batch_loss

pytestmark = pytest.mark.usefixtures("single_thread")

READS = ("coarse_only", "coarse_fine", "autoregressive")


def expected_rows(sh: gpu_suite.SuiteShapes) -> list[tuple[str, str, int]]:
    """(section, measurement, frames) of every row, in order, for a CPU run (no compiled decode rows)."""
    rows = [("train", f"{r} step", t) for t in sh.train_frames for r in READS]
    t = max(sh.train_frames)
    rows += [("loader", f"{k}, {w} worker{'s' if w > 1 else ''}, per worker", t) for k in ("mp4", "jpeg")
             for w in sh.workers]  # fmt: skip
    kinds = ("read, eager", f"read + {sh.answer} tokens, eager",
             f"read + {sh.answer} tokens, static cache (compiled on a GPU only)")  # fmt: skip
    rows += [("latency", f"{r} {k}", t) for t in sh.read_frames for r in READS for k in kinds]
    rows += [("decode", f"greedy, per token, {c}", sh.read_frames[0]) for c in ("dynamic cache", "static cache")]
    return rows


@pytest.mark.usefixtures("tokenizer")  # the loader's processor tokenises with the packaged SmolLM2 tokenizer
def test_tiny_suite_runs_end_to_end_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "suite" / "gpu.json"
    bench.main(["--suite", "gpu", "--tiny", "--device", "cpu", "--out", str(out)])
    sh = gpu_suite.TINY_SHAPES
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["torch"] == torch.__version__ and result["cuda"] == "none"
    assert result["precision"] == "fp32" and result["dense bf16 peak TFLOP/s"] == "n/a"
    assert result["model"] == "foveated, tiny random" and 0 < result["seconds"] < gpu_suite.TINY_SHAPES.budget_s
    assert tuple(result["columns"]) == gpu_suite.SUITE_COLUMNS
    rows = result["rows"]
    assert [(r["section"], r["measurement"], r["frames"]) for r in rows] == expected_rows(sh)
    assert all(tuple(r) == gpu_suite.SUITE_COLUMNS for r in rows)
    assert not [r for r in rows if r["section"] != "loader" and r["note"]]  # nothing failed, skipped or ran out
    assert all(r["peak GiB"] is None for r in rows)  # no CUDA, no peak memory
    # every figure measured; a decode row is a difference of two timings, which a busy CPU can turn below 0 at tiny
    # shapes
    assert all(r["ms"] > 0 for r in rows if r["section"] != "decode") and all(math.isfinite(r["ms"]) for r in rows)
    by = {(r["section"], r["measurement"], r["frames"]): r for r in rows}

    for r in rows:
        if r["section"] == "latency":
            base = by["latency", "coarse_only " + r["measurement"].split(" ", 1)[1], r["frames"]]
            assert r["ratio"] == pytest.approx(r["ms"] / base["ms"])
    dynamic = by["decode", "greedy, per token, dynamic cache", sh.read_frames[0]]
    assert dynamic["ratio"] == 1.0 and dynamic["tokens/s"] == (pytest.approx(1000 / dynamic["ms"]) if dynamic["ms"] > 0
                                                                else None)  # fmt: skip

    model = gpu_suite.suite_model(tiny=True)[0]
    for t in sh.train_frames:
        for read in READS:
            r = by["train", f"{read} step", t]
            seconds = r["ms"] / 1000
            assert r["samples/s"] == pytest.approx(sh.batch / seconds)
            assert r["frames/s"] == pytest.approx(sh.batch * t / seconds)
            assert r["tokens/s"] == pytest.approx(sh.batch * (t + sh.text) / seconds)  # one token per frame
            flops = gpu_suite.foveated_flops(model, sh.batch, t, sh.text, sh.size, read)
            assert r["TFLOP/s"] == pytest.approx(flops / seconds / 1e12) and r["MFU %"] == "n/a"

    fastest = max((r for r in rows if r["section"] == "train" and r["frames"] == max(sh.train_frames)),
                  key=lambda r: r["frames/s"])  # fmt: skip
    for r in (r for r in rows if r["section"] == "loader"):
        w = int(r["measurement"].split(", ")[1].split()[0])
        assert r["frames/s"] > 0 and r["samples/s"] * r["frames"] == pytest.approx(r["frames/s"] * w)  # per worker
        workers = fastest["frames/s"] / r["frames/s"]
        assert r["note"] == (f"{workers:.1f} workers feed the fastest step at {r['frames']} frames "
                             f"({fastest['measurement']}, {fastest['frames/s']:.0f} frames/s)")  # fmt: skip

    table = out.with_suffix(".md").read_text()
    printed = capsys.readouterr().out
    lines = table.splitlines()
    head = lines.index("| " + " | ".join(gpu_suite.SUITE_COLUMNS) + " |")
    assert lines[:head] == [f"- {k}: {v}" for k, v in result.items() if k not in ("columns", "rows")] + [""]
    assert len(lines) == head + 2 + len(rows) and all(line.count(" | ") == len(gpu_suite.SUITE_COLUMNS) - 1
                                                      for line in lines[head + 2 :])  # fmt: skip
    assert lines[head + 2].startswith("| train | coarse_only step | 2 | ") and lines[head + 2] in printed


def test_a_failed_or_late_row_is_a_note_and_the_files_follow_each_row(tmp_path):
    """A GPU is lent for minutes: one row's error is its note, the rest go on, rows past the budget are skipped, and
    what was measured is on disk after every row."""
    out = tmp_path / "gpu.json"
    suite = gpu_suite.Suite(torch.device("cpu"), gpu_suite.TINY_SHAPES, {"device": "here"}, out, time.monotonic())

    def broken() -> dict:
        raise RuntimeError("no kernel image is available\nsecond line")

    suite.measure("latency", "fine", 8, lambda: {"ms": 2.0, "ratio": 1.0})
    suite.measure("latency", "broken", 8, broken)
    assert [r["note"] for r in json.loads(out.read_text())["rows"]] == ["", "failed: RuntimeError: no kernel image "
                                                                            "is available"]  # fmt: skip
    suite.start -= gpu_suite.TINY_SHAPES.budget_s + 1
    late = suite.measure("decode", "late", 8, lambda: {"ms": 1.0})
    assert late["note"] == "skipped: the time budget is spent" and late["ms"] is None
    assert suite.find("latency", "fine", 8)["ms"] == 2.0 and suite.find("latency", "fine", 64) is None
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "- device: here" and table[-1].startswith("| decode | late | 8 |")
    assert table[-1].endswith("| skipped: the time budget is spent |")


def test_the_real_shapes_need_a_gpu():
    with pytest.raises(UserError, match="needs a CUDA device .*add --tiny"):
        bench.main(["--suite", "gpu", "--device", "cpu"])


DENSE = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.convolution, torch.ops.aten.convolution_backward)


def dense_flops(model, batch, mode: str, train: bool) -> int:
    """torch's count of the dense matmuls (linear layers, the patch convolution) of a step; attention's left out."""
    with FlopCounterMode(display=False) as counter:
        if train:
            batch_loss(model, batch, {"mode": mode}).backward()
        else:
            with torch.no_grad():
                batch_loss(model, batch, {"mode": mode})
    model.zero_grad(set_to_none=True)
    return sum(v for op, v in counter.get_flop_counts()["Global"].items() if op in DENSE)


def test_step_flops_are_the_dense_matmuls_torch_counts():
    """Every part training (the suite's stage-1 step): the count equals torch's; the forward alone too; with both
    backbones frozen the backward shrinks as autograd's does (within 2 %: it skips a few more matmuls)."""
    model = gpu_suite.suite_model(tiny=True)[0].train()
    batch = gpu_suite.random_batch(model, torch.device("cpu"), frames=3, batch=2, text=8, size=16)
    trained = {}
    for mode in READS:
        trained[mode] = gpu_suite.foveated_flops(model, 2, 3, 8, 16, mode)
        assert trained[mode] == pytest.approx(dense_flops(model, batch, mode, True), rel=1e-3), mode
        forward = gpu_suite.foveated_flops(model, 2, 3, 8, 16, mode, train=False)
        assert forward == pytest.approx(dense_flops(model, batch, mode, False), rel=1e-3), mode
        assert 2.9 < trained[mode] / forward < 3.0  # the patch convolution takes no gradient for the pixels
    for name, p in model.named_parameters():
        p.requires_grad_(model.group_of(name) not in ("vision", "llm"))
    for mode in READS:
        counted = gpu_suite.foveated_flops(model, 2, 3, 8, 16, mode)
        torch_count = dense_flops(model, batch, mode, True)
        assert torch_count <= counted <= 1.02 * torch_count and counted < 0.5 * trained[mode], mode


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
     ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)],
)  # fmt: skip
def test_dense_bf16_peak_by_device_name(name, peak):
    assert gpu_suite.peak_of(name) == peak
    assert gpu_suite.peak_bf16(torch.device("cpu")) is None


def test_fused_adamw_only_where_every_trained_parameter_is_on_cuda():
    cuda, cpu, meta = torch.device("cuda", 0), torch.device("cpu"), torch.device("meta")
    assert fused_on([cuda, cuda]) and fused_on(["cuda:1"])
    assert not fused_on([cuda, cpu]) and not fused_on([cpu]) and not fused_on([meta]) and not fused_on([])
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"]
    assert all(not g["fused"] for g in opt.param_groups)
    forced = build_optimizer(model, OptimConfig(), fused=True)  # a caller may still ask (torch fuses on a CPU too)
    assert forced.defaults["fused"]


def test_adamw8bit_is_refused_off_cuda_in_one_line():
    with pytest.raises(ConfigError) as refused:
        build_optimizer(tiny_model(), OptimConfig(optimizer="adamw8bit"))
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("'optim.optimizer' adamw8bit runs on CUDA only (bitsandbytes), but the parameters are on cpu: "
                       "set optim.optimizer=adamw")  # fmt: skip
    with pytest.raises(ConfigError, match=r"'optim.optimizer' must be one of \('adamw', 'adamw8bit'\), got 'sgd'"):
        OptimConfig(optimizer="sgd")


@pytest.mark.skipif(optim.bitsandbytes is not None, reason="bitsandbytes is installed here")
def test_adamw8bit_on_cuda_without_bitsandbytes_says_what_to_install():
    with pytest.raises(ConfigError) as refused:
        optim._adamw8bit([], 0.01, [torch.device("cuda", 0)])
    assert str(refused.value) == ("'optim.optimizer' adamw8bit needs bitsandbytes: pip install bitsandbytes (or set "
                                  "optim.optimizer=adamw)")  # fmt: skip
