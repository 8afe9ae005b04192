"""FSDP2 (train.parallel: fsdp) against DDP: 2 gloo processes on the CPU, the tiny foveated model, fp32.

Four runs (DDP and FSDP, with every group training and with both backbones frozen), then FSDP's again, killed at
step 5 and resumed, and DDP's resumed by FSDP; each run's two processes are forked from the test, as torchrun
would start them. Tolerances: losses to 1e-6 relative; weights and AdamW moments to 1e-5, but the DINOv2 key
biases (see `test_fsdp_trains_as_ddp`). Observed on an AMD EPYC: losses within 5e-8, weights within 2e-6, key
biases within 1e-5. The memory table's arithmetic (training/memory.py) is checked at the end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

import cli
import train
from release import KNOWN_BACKBONES
from tests.test_train import config_yaml, log_rows, losses, make_config, write_sized_shards
from tests.tiny import tiny_dino, tiny_llm, tiny_model
from training import checkpoints as ckpt
from training import memory
from vlm import saved

pytestmark = pytest.mark.usefixtures("single_thread")


class Crash(Exception):
    """Stands in for both processes dying between two steps."""


class Recorded(train.Trainer):
    """The trainer, dying when `crash` steps are done, noting each batch's frame count before and after
    `same_frames` (what FSDP reads) in `frames`, and each parameter's shape and the size of this process's shard
    in `shards`."""

    crash, frames, shards = -1, [], {}

    def __init__(self, *args):
        super().__init__(*args)
        local = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in self.raw.named_parameters()}
        Recorded.shards = {n: [list(p.shape), local[n].numel()] for n, p in self.raw.named_parameters()}

    def step(self):
        if self.state.step == self.crash:
            raise Crash
        return super().step()

    def same_frames(self, batch):
        out = super().same_frames(batch)
        self.frames.append([batch["frame_mask"].shape[1], out["frame_mask"].shape[1]])
        return out


def _rank(rank: int, port: int, config: str, crash: int) -> None:
    """One of the 2 gloo processes of a run, as torchrun would start it; forked from the test, whose imports are
    done (two imports of torch and transformers take longer than a run's six steps)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    tqdm.set_lock(threading.RLock())  # the parent's lock is shared by a fork (test_faults.py)
    train.Trainer, Recorded.crash = Recorded, crash
    try:
        train.main(["--config", config])
    except Crash:
        sys.exit(3)
    out = Path(config).with_suffix("")
    (out / f"frames{rank}.json").write_text(json.dumps(Recorded.frames))
    (out / f"shards{rank}.json").write_text(json.dumps(Recorded.shards))


def two_processes(config: Path, crash: int = -1) -> list[int]:
    """Train `config` with 2 processes; their exit codes."""
    fork, port = multiprocessing.get_context("fork"), free_port()
    procs = [fork.Process(target=_rank, args=(rank, port, str(config), crash)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.exitcode is None:
            p.kill()
    return [p.exitcode for p in procs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS = 6
RUNS = {  # name: (parallel, optim)
    "ddp": ("ddp", {}),
    "fsdp": ("fsdp", {}),
    "ddp_frozen": ("ddp", {"lr_vision": 0.0, "lr_llm": 0.0}),
    "fsdp_frozen": ("fsdp", {"lr_vision": 0.0, "lr_llm": 0.0}),
    "cut": ("fsdp", {}),  # fsdp's run, killed at step 5 and resumed from its step-4 checkpoint
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, start_model) -> Path:
    """The runs over shards of unequal sizes whose samples hold 0-2 frames, so a process often reads a batch
    without frames while the other's has some; validation over the same shards, more batches than one process
    holds. Returns their folder: run `name` writes to name/."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = {"train": write_sized_shards(tmp, [3, 7, 2, 5, 4]), "batch_size": 2}
    data["val"] = data["train"]
    opts = {"max_steps": STEPS, "accumulate": 2, "save_every": 2, "val_every": 3, "val_batches": 20, "bf16": False}
    began = time.perf_counter()
    for name, (parallel, optim) in RUNS.items():
        cfg = make_config(tmp, start_model, name, data=data, train={**opts, "parallel": parallel}, optim=optim)
        config = tmp / f"{name}.yaml"
        config.write_text(config_yaml(cfg))
        if name == "cut":
            assert two_processes(config, crash=5) == [3, 3]
            assert len(log_rows(tmp / name)) == 5
        assert two_processes(config) == [0, 0], name  # resume: auto, for the cut run
    # DDP's step-4 checkpoint continued by FSDP
    shutil.copytree(ckpt.checkpoint_dir(tmp / "ddp", 4), ckpt.checkpoint_dir(tmp / "switched", 4))
    cfg = make_config(tmp, start_model, "switched", data=data, train={**opts, "parallel": "fsdp"})
    (tmp / "switched.yaml").write_text(config_yaml(cfg))
    assert two_processes(tmp / "switched.yaml") == [0, 0]
    print(f"seven runs of up to {STEPS} steps, 2 processes each: {time.perf_counter() - began:.1f} s")
    return tmp


def final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / saved.WEIGHTS))


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, skip: str = "\0") -> None:
    assert a.keys() == b.keys()
    for key in (k for k in a if skip not in k):
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), (key, (a[key] - b[key]).abs().max().item())


@pytest.mark.parametrize("frozen", [False, True], ids=["every_group_trains", "backbones_frozen"])
def test_fsdp_trains_as_ddp(runs, start_model, frozen):
    """Same losses (training and validation), final weights and optimizer moments. The key biases of DINOv2's
    attention have no gradient (a shift shared by every key leaves the softmax unchanged), so AdamW's normalised
    step moves them by the float noise of the reduction: they are compared to the bound of that step instead."""
    ddp, fsdp = (runs / (name + ("_frozen" if frozen else "")) for name in ("ddp", "fsdp"))
    a, b = log_rows(ddp), log_rows(fsdp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(s) for s in range(1, STEPS + 1)]
    for key in ("loss", "val_loss"):
        for x, y in zip(a, b, strict=True):
            assert (x[key] == "") == (y[key] == "")
            assert x[key] == "" or float(y[key]) == pytest.approx(float(x[key]), rel=1e-6, abs=0), key
    wa, wb = final(ddp), final(fsdp)
    close(wa, wb, 1e-5, skip="attention.k_proj.bias")
    lr_vision = 0.0 if frozen else 1e-3
    close(wa, wb, 2 * lr_vision * STEPS + 1e-6)
    sa, sb = (load_file(str(ckpt.checkpoint_dir(run, STEPS) / ckpt.STATE_TENSORS)) for run in (ddp, fsdp))
    optim = {k for k in sa if k.startswith("optim.")}
    assert optim == {k for k in sb if k.startswith("optim.")}  # one format; no moments for a frozen weight
    meta = [json.loads((ckpt.checkpoint_dir(run, STEPS) / ckpt.STATE_JSON).read_text()) for run in (ddp, fsdp)]
    assert meta[0]["optimizer"]["param_groups"] == meta[1]["optimizer"]["param_groups"]
    close({k: sa[k] for k in optim}, {k: sb[k] for k in optim}, 1e-5)
    start = load_file(str(start_model / saved.WEIGHTS))
    backbone = [k for k in start if k.startswith(("encoder.dino.", "llm."))]
    groups = [g["name"] for g in meta[1]["optimizer"]["param_groups"]]
    if frozen:  # bit for bit the starting backbones, and only the connector in the optimizer
        assert groups == ["connector"] and all(torch.equal(start[k], wb[k]) for k in backbone)
    else:
        embeddings = "llm.model.embed_tokens.weight"  # tied to the LM head, saved once
        assert groups == ["connector", "vision", "llm"] and not torch.equal(start[embeddings], wb[embeddings])
    # the case that would hang FSDP without padding: a process read a batch without frames while the other's had some
    padded = [pair for r in (0, 1) for pair in json.loads((fsdp / f"frames{r}.json").read_text())]
    assert any(t == 0 < after for t, after in padded) and all(after >= t for t, after in padded)


def test_fsdp_resumes_exactly(runs):
    """Killed at step 5, resumed from the step-4 checkpoint (gathered whole, sharded again): the uninterrupted
    run's losses, digit for digit, and its final weights bit for bit."""
    assert losses(runs / "cut") == losses(runs / "fsdp")
    a, b = final(runs / "fsdp"), final(runs / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_ddp_checkpoint_continues_under_fsdp(runs):
    """One checkpoint format: DDP's step-4 checkpoint, resumed by FSDP, gives DDP's steps 5 and 6."""
    ddp, switched = log_rows(runs / "ddp"), log_rows(runs / "switched")
    assert [r["step"] for r in switched] == ["5", "6"]
    for x, y in zip(ddp[4:], switched, strict=True):
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), rel=1e-6, abs=0)


def _user(rank: int, port: int, config: str, err: str) -> None:
    """A process as `torchrun ... train.py` runs it, its errors as the command prints them (cli.run), into `err`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    tqdm.set_lock(threading.RLock())
    sys.stderr = open(err, "w", buffering=1)  # this process's stderr until it exits (pytest may have replaced it)
    os.dup2(sys.stderr.fileno(), 2)
    cli.run(train.main, ["--config", config])


def test_a_killed_fsdp_process_stops_the_other_with_a_clear_error(tmp_path, start_model):
    """As for DDP (test_faults.py): rank 1 gets SIGKILL mid-run; rank 0 ends within a bounded time with one line
    naming the step, not a hang or a backend traceback."""
    cfg = make_config(tmp_path, start_model, "run", data={"batch_size": 1},
                      train={"max_steps": 500, "accumulate": 1, "save_every": 100, "ddp_timeout": 30,
                             "parallel": "fsdp"})  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(config_yaml(cfg))
    fork, port = multiprocessing.get_context("fork"), free_port()
    errs = [tmp_path / f"err{r}.txt" for r in (0, 1)]
    procs = [fork.Process(target=_user, args=(r, port, str(config), str(errs[r]))) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        log = Path(cfg.train.out_dir) / "log.csv"
        deadline = time.time() + 120
        while not (log.is_file() and len(log.read_text().splitlines()) > 3):
            assert time.time() < deadline and procs[0].is_alive(), errs[0].read_text()[-2000:]
            time.sleep(0.05)
        procs[1].kill()  # SIGKILL
        killed = time.time()
        procs[0].join(timeout=90)
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    err = errs[0].read_text()
    assert procs[0].exitcode == 2 and waited < 60, (procs[0].exitcode, waited, err[-2000:])
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 lost the other processes at step ") and "train.resume=auto" in last
    print(f"rank 0 stopped {waited:.1f} s after rank 1 was killed")


# ---- training/memory.py: the docs' memory table ------------------------------------------------------------


def test_memory_counts_the_tiny_models_parameters():
    """Every parameter's name, shape and group as the tiny foveated model has them."""
    model = tiny_model()
    shapes = memory.foveated_shapes(tiny_dino().config.to_dict(), tiny_llm().config.to_dict(), query_dim=16)
    assert shapes == {name: tuple(p.shape) for name, p in model.named_parameters()}
    group = {name: model.group_of(name).replace("query", "connector") for name, _ in model.named_parameters()}
    assert {name: memory.group(name) for name in shapes} == group


@pytest.mark.parametrize("llm", ["SmolLM2-135M-Instruct", "SmolLM2-1.7B-Instruct"])
def test_memory_counts_the_published_backbones(llm):
    """The shapes of the table's backbones, built without memory (meta device) by transformers: 134.5M and 1.71B
    LLM parameters, 22.1M for DINOv2-small."""
    configs = {"dinov2-small": (Dinov2Config, Dinov2Model), llm: (LlamaConfig, LlamaForCausalLM)}
    counts = {}
    for name, (config_class, model_class) in configs.items():
        config = {k: v for k, v in KNOWN_BACKBONES[name].items() if k != "model_type"}
        with torch.device("meta"):
            real = model_class(config_class(**config))
        counted = (memory.dino_shapes if name.startswith("dinov2") else memory.llm_shapes)(config, prefix="")
        assert counted == {n: tuple(p.shape) for n, p in real.named_parameters()}
        counts[name] = sum(memory.numel(shape) for shape in counted.values())
    assert counts["dinov2-small"] == 22_056_576
    assert counts[llm] == {"SmolLM2-135M-Instruct": 134_515_008, "SmolLM2-1.7B-Instruct": 1_711_376_384}[llm]


def test_memory_shards_as_fsdp2_does(runs):
    """Each parameter's shard on each of the 2 processes of the FSDP run is the size memory.shard says, and the
    shards add up to the parameter; the table's FSDP rows count the padded shard every process allocates."""
    ranks = [json.loads((runs / "fsdp" / f"shards{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    uneven = 0
    for name, (shape, _) in ranks[0].items():
        sizes = [ranks[r][name][1] for r in (0, 1)]
        assert sizes == [memory.shard(tuple(shape), 2, r) for r in (0, 1)], name
        assert sum(sizes) == memory.numel(tuple(shape)) and max(sizes) == memory.shard(tuple(shape), 2)
        uneven += sizes[0] != sizes[1]
    assert uneven  # odd first dimensions (q_static's 1 row) are in the test
    shapes = {name: tuple(shape) for name, (shape, _) in ranks[0].items()}
    whole, two = memory.per_gpu(shapes, 1, "fsdp"), memory.per_gpu(shapes, 2, "fsdp")
    padded = sum(memory.shard(shape, 2) for shape in shapes.values())
    assert two["optimizer"] == 8 * padded and whole["optimizer"] == 8 * sum(map(memory.numel, shapes.values()))
    frozen = memory.per_gpu(shapes, 2, "fsdp", trained=("connector",))
    assert frozen["optimizer"] == 8 * sum(
        memory.shard(s, 2) for n, s in shapes.items() if memory.group(n) == "connector"
    )
