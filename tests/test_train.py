"""Training loop on a tiny model (CPU, fp32) over real WebDataset shards: exact resume, crash-safe
checkpoints, DPO, DDP, strict config, frozen groups and LR schedules."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from conftest import Crash, jpeg
from safetensors.torch import load_file

import train
from collate import pad_text
from config import Config, ConfigError, OptimConfig, from_dict, load_config, to_dict
from evals.answering import Answerer
from inputs.frames import FrameSpec
from inputs.tokenization import chat_ids
from model import MODES, FoveatedVLM
from tests.tiny import IMAGE, frames, tiny_model
from training import checkpoints as ckpt
from training.optim import build_optimizer
from training.schedule import Schedule
from vlm import saved
from vlm.loss import batch_loss, pair_batch

REPO = Path(__file__).resolve().parent.parent


# One thread: these tiny models are too small to gain from two, and OpenMP threads spinning against
# other processes on a 2-core machine make each step up to 20x slower.
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("single_thread")


def write_shards(root: Path, name: str, n_shards: int, per_shard: int, dpo: bool = False, corrupt: bool = False) -> str:
    """Samples with 1-3 numbered JPEG frames, every third one text-only; `corrupt` adds one undecodable
    sample to the first shard."""
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{name}-{s}.tar")) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                text = {"user": f"What is shown in clip {i}?"}
                if dpo:  # a toy preference: always the same chosen and rejected answer
                    text.update(chosen="A red square.", rejected="Nothing at all, sorry.")
                else:
                    text["assistant"] = f"Colour number {i}."
                sample = {"__key__": f"{name}{i:04d}", "json": text}
                if i % 3:
                    sample.update({f"{f:03d}.jpg": jpeg((25 * i % 256, 40 * f, 90)) for f in range(1 + i % 3)})
                sink.write(sample)
            if corrupt and s == 0:
                sink.write({"__key__": f"{name}-bad", "json": text, "000.jpg": b"not a jpeg"})
    return str(root / f"{name}-*.tar")


def make_config(tmp: Path, start: Path, out: str = "run", **sections) -> Config:
    base = {
        "data": {
            "train": write_shards(tmp, "train", 2, 5),
            "batch_size": 2,
            "frame_size": IMAGE,
            "max_frames": 4,
            "max_text_len": 48,
            "num_workers": 0,
            "shuffle_buffer": 4,
            "stage": 2,
        },
        "optim": {"lr_connector": 1e-2, "lr_vision": 1e-3, "lr_llm": 1e-3, "schedule": "cosine", "warmup": 0.2},
        "train": {
            "init_from": str(start),
            "max_steps": 6,
            "accumulate": 2,
            "save_every": 2,
            "keep_last": 2,
            "keep_best": 0,
            "out_dir": str(tmp / out),
        },
    }
    for name, values in sections.items():
        base[name].update(values)
    return from_dict(Config, base)


def config_yaml(cfg: Config) -> str:
    """The run config as a user would write it: the model comes from train.init_from, so no model section."""
    return yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k != "model"})


def log_rows(out_dir: str | Path) -> list[dict]:
    with (Path(out_dir) / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def losses(out_dir: str | Path) -> list[tuple[str, str, str]]:
    """(step, loss, lr) of every logged step, as written (exact decimal repr)."""
    return [(r["step"], r["loss"], r["lr_connector"]) for r in log_rows(out_dir)]


def crash_after(monkeypatch, steps: int) -> None:
    """Make the run die once `steps` steps are done and logged (whatever its last checkpoint)."""
    real = train.Trainer.step

    def step(self):
        if self.state.step == steps:
            raise Crash
        return real(self)

    monkeypatch.setattr(train.Trainer, "step", step)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path, start_model, monkeypatch, workers):
    cfg = make_config(tmp_path, start_model, data={"num_workers": workers}, optim={"lr_vision": 0.0})
    train.train(cfg)
    whole = losses(cfg.train.out_dir)
    assert [r[0] for r in whole] == [str(s) for s in range(1, 7)]
    assert len({r[1] for r in whole}) == 6  # the loss moves: the comparison below means something

    cut = make_config(tmp_path, start_model, "cut", data={"num_workers": workers}, optim={"lr_vision": 0.0})
    with monkeypatch.context() as m:
        crash_after(m, 5)  # last checkpoint at step 4 (mid-epoch 1: 5 batches/epoch, 2 per step)
        with pytest.raises(Crash):
            train.train(cut)
    assert len(log_rows(cut.train.out_dir)) == 5
    train.train(cut)  # resume: auto
    assert losses(cut.train.out_dir) == whole  # step 5 is logged once, with the same values

    a = load_file(str(Path(cfg.train.out_dir) / "final" / saved.WEIGHTS))
    b = load_file(str(Path(cut.train.out_dir) / "final" / saved.WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if workers == 0:  # the rest is independent of the loader
        kept = [p.name for p in ckpt.list_checkpoints(cut.train.out_dir)]
        assert kept == ["step-00000004", "step-00000006"]
        assert (Path(cut.train.out_dir) / "checkpoints" / kept[-1] / "config.yaml").is_file()
        assert yaml.safe_load((Path(cut.train.out_dir) / "config.yaml").read_text()) == to_dict(cut)
        # the final model is the last checkpoint's, linked rather than written twice, and outlives its deletion
        run = Path(cut.train.out_dir)
        last, final_dir = run / "checkpoints" / kept[-1] / ckpt.MODEL_DIR, run / "final"
        files = [sorted(p.relative_to(d) for p in d.rglob("*")) for d in (last, final_dir)]
        assert files[0] == files[1] and len(files[0]) > 3
        assert (final_dir / saved.WEIGHTS).read_bytes() == (last / saved.WEIGHTS).read_bytes()
        shutil.rmtree(run / "checkpoints")
        assert all(torch.equal(b[k], v) for k, v in load_file(str(final_dir / saved.WEIGHTS)).items())
        # lr 0 froze DINO bit for bit, while the other groups moved
        init = load_file(str(start_model / saved.WEIGHTS))
        assert all(torch.equal(init[k], a[k]) == k.startswith("encoder.dino.") for k in init if "norm" not in k)
        final = FoveatedVLM.from_pretrained(Path(cfg.train.out_dir) / "final")
        assert final.tokenizer is not None
        # the model remembers how it was fed, and the commands that load it default to that
        assert final.frames == FrameSpec(size=IMAGE, max_frames=4, image_frames=8, fps=None)
        fed = Answerer(final).frames  # what benchmark.py and chat.py read media with
        assert (fed.size, fed.max_frames, fed.image_frames) == (IMAGE, 4, 8)


def cut_and_resumed(tmp_path, start_model, monkeypatch, opts: dict) -> Config:
    """A run of `opts` (DINOv2 frozen) crashed after step 3, then resumed to its end."""
    cut = make_config(tmp_path, start_model, "cut", train=opts, optim={"lr_vision": 0.0})
    with monkeypatch.context() as m:
        crash_after(m, 3)
        with pytest.raises(Crash):
            train.train(cut)
    train.train(cut)
    return cut


@pytest.mark.parametrize("bf16", [True, False])
def test_a_run_is_repeatable_and_resumes_exactly_in_either_precision(tmp_path, start_model, monkeypatch, bf16):
    """Set both ways whatever this CPU has (bf16 autocast is emulated where it has no bf16 units): two runs of one
    config log the same losses and end in the same weights, and so does one cut at step 3 and resumed."""
    opts = {"bf16": bf16, "max_steps": 5}
    runs = []
    for name in ("one", "two"):
        cfg = make_config(tmp_path, start_model, name, train=opts, optim={"lr_vision": 0.0})
        train.train(cfg)
        runs.append(cfg)
    cut = cut_and_resumed(tmp_path, start_model, monkeypatch, opts)
    whole = losses(runs[0].train.out_dir)
    assert len({r[1] for r in whole}) == 5 and losses(runs[1].train.out_dir) == whole == losses(cut.train.out_dir)
    a = load_file(str(Path(runs[0].train.out_dir) / "final" / saved.WEIGHTS))
    for other in (runs[1], cut):
        b = load_file(str(Path(other.train.out_dir) / "final" / saved.WEIGHTS))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init_scale", [None, 2.0**40])
def test_fp16_with_its_gradient_scaler_resumes_exactly(tmp_path, start_model, monkeypatch, init_scale):
    """train.fp16 (what a GPU without bf16 trains in): autocast in fp16, the loss scaled and the gradients unscaled
    before clipping; the scaler's state is part of the checkpoint, so a run cut at step 3 and resumed logs the
    uninterrupted run's losses and ends in its weights and its scale. From a scale of 2^40 every step's gradients
    overflow: each is skipped and halves the scale (not counted as a NaN step)."""
    if init_scale is not None:
        monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=init_scale))
    opts = {"fp16": True, "max_steps": 5}
    whole = make_config(tmp_path, start_model, "whole", train=opts, optim={"lr_vision": 0.0})
    train.train(whole)
    cut = cut_and_resumed(tmp_path, start_model, monkeypatch, opts)
    assert losses(cut.train.out_dir) == losses(whole.train.out_dir)
    a = load_file(str(Path(whole.train.out_dir) / "final" / saved.WEIGHTS))
    b = load_file(str(Path(cut.train.out_dir) / "final" / saved.WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    scales = []
    for run in (whole, cut):
        last = ckpt.list_checkpoints(run.train.out_dir)[-1]
        scales.append(json.loads((last / ckpt.STATE_JSON).read_text())["train_state"]["scaler"])
    assert scales[0] == scales[1] and scales[0]["scale"] == (2.0**35 if init_scale else 2.0**16)
    init = load_file(str(start_model / saved.WEIGHTS))
    assert all(torch.equal(init[k], a[k]) for k in init) == bool(init_scale)  # trained, or every step skipped
    with pytest.raises(ConfigError, match="'train.fp16' and 'train.bf16' are both true"):
        make_config(tmp_path, start_model, "both", train={"fp16": True, "bf16": True})


def test_gradient_checkpointing_changes_no_number(tmp_path, start_model):
    runs = []
    for name, flag in (("plain", False), ("checkpointed", True)):
        cfg = make_config(tmp_path, start_model, name, train={"max_steps": 2, "gradient_checkpointing": flag})
        train.train(cfg)
        runs.append(losses(cfg.train.out_dir))
    assert runs[0] == runs[1]


def test_runs_trained_together_end_as_they_would_alone_and_share_the_frozen_pass(tmp_path, start_model, monkeypatch):
    """A run and its glance (the same model and data, read coarse_only) taking steps in turn: each logs the losses
    and ends with the weights it has alone, bit for bit, while the glance's every DINOv2 patch pass is the run's."""
    import encoder

    def config(out: str, mode: str) -> Config:
        cfg = make_config(tmp_path, start_model, out, optim={"lr_vision": 0.0}, train={"max_steps": 4})
        cfg.model.mode = mode
        return cfg

    alone = [config("fov_alone", "coarse_fine"), config("glance_alone", "coarse_only")]
    for cfg in alone:
        train.train(cfg)
    calls: list[tuple[int, bool]] = []  # (encoder, whether the memo had its pass)
    real_get = encoder.PatchMemo.get

    def get(self, enc, frames):
        found = real_get(self, enc, frames)
        calls.append((id(enc), found is not None))
        return found

    monkeypatch.setattr(encoder.PatchMemo, "get", get)
    together = [config("fov", "coarse_fine"), config("glance", "coarse_only")]
    finals = train.train_together(together)
    assert finals == [Path(cfg.train.out_dir) / "final" for cfg in together]
    for a, b in zip(alone, together, strict=True):
        assert losses(a.train.out_dir) == losses(b.train.out_dir)
        x = load_file(str(Path(a.train.out_dir) / "final" / saved.WEIGHTS))
        y = load_file(str(Path(b.train.out_dir) / "final" / saved.WEIGHTS))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    first = calls[0][0]
    glance = [hit for enc, hit in calls if enc != first]
    assert len(glance) == 4 * 2 and all(glance)  # 4 steps of 2 micro-batches, each read by the run just before
    with pytest.raises(Exception, match="their own train.out_dir each"):
        train.train_together([config("same", "coarse_fine"), config("same", "coarse_only")])


def test_killed_during_checkpoint_write_keeps_the_previous_one(tmp_path, start_model):
    cfg = make_config(tmp_path, start_model)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(config_yaml(cfg))
    driver = tmp_path / "die_in_save.py"  # SIGKILLs itself in the middle of the second checkpoint write
    driver.write_text(
        textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import train
        from training import checkpoints
        from vlm import saved
        real, calls = saved.save_file, []
        def save_file(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:  # each checkpoint writes the weights, then the optimizer state
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        saved.save_file = checkpoints.save_file = save_file  # the model directory, then the optimizer state
        train.main(["--config", {str(config_file)!r}])
        """)
    )
    cmd = [sys.executable, str(driver)]
    proc = subprocess.run(cmd, cwd=REPO, env=SINGLE_THREAD, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = Path(cfg.train.out_dir) / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".step-00000004.tmp-")]  # died mid-write
    assert [p.name for p in ckpt.list_checkpoints(cfg.train.out_dir)] == ["step-00000002"]
    model = FoveatedVLM.from_pretrained(root / "step-00000002" / ckpt.MODEL_DIR)
    state = ckpt.load_training(root / "step-00000002", build_optimizer(model, cfg.optim), rank=0)
    assert (state.step, state.epoch, state.batches) == (2, 0, 4)

    train.train(cfg)  # resume: auto, from step 2
    assert [r["step"] for r in log_rows(cfg.train.out_dir)] == [str(s) for s in range(1, 7)]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]  # staging dir cleaned


def test_dpo_starts_at_log2_and_learns_the_preference(tmp_path, start_model):
    pairs = write_shards(tmp_path, "pairs", 1, 4, dpo=True, corrupt=True)
    cfg = make_config(
        tmp_path,
        start_model,
        data={"stage": 3, "train": pairs, "val": pairs},
        optim={"schedule": "constant", "warmup": 0.0},
        train={"max_steps": 8, "accumulate": 1, "save_every": 8, "val_every": 4, "keep_best": 1},
    )
    train.train(cfg)
    rows = log_rows(cfg.train.out_dir)
    dpo = [float(r["loss"]) for r in rows]
    assert dpo[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert dpo[-1] < 0.5 * math.log(2), dpo
    assert float(rows[-1]["val_loss"]) < float(rows[3]["val_loss"]) < math.log(2)
    assert sum(int(r["skipped"]) for r in rows) >= 3  # the bad sample, once per epoch (3 batches each)


DDP_DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from safetensors.torch import save_model
import data, train
rank = os.environ["RANK"]
served, runs, real = [], [], data.make_loader
def recorded(cfg, tokenizer, rank=0, world_size=1, epoch=0, skip_batches=0, split="train"):
    for batch in real(cfg, tokenizer, rank, world_size, epoch, skip_batches, split):
        if split == "train":
            served.append([epoch, list(batch["keys"])])  # taken by the training stream, in order
        yield batch
data.make_loader = recorded
class Crash(Exception):
    pass
class Recorded(train.Trainer):
    def __init__(self, *args):
        super().__init__(*args)
        runs.append(self)
    def step(self):
        if self.state.step == {crash}:
            raise Crash
        return super().step()
train.Trainer = Recorded
try:
    train.main(["--config", {config!r}])
except Crash:
    sys.exit(3)
save_model(runs[0].raw, os.path.join({out!r}, "rank" + rank + ".safetensors"))
with open(os.path.join({out!r}, "served" + rank + ".json"), "w") as f:
    json.dump(served, f)
"""


def torchrun(tmp_path: Path, cfg: Config, crash: int = -1) -> subprocess.CompletedProcess:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(config_yaml(cfg))
    driver = tmp_path / "ranks.py"
    out = str(cfg.train.out_dir)
    driver.write_text(DDP_DRIVER.format(repo=str(REPO), config=str(config_file), out=out, crash=crash))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    return subprocess.run(cmd, cwd=REPO, env=SINGLE_THREAD, capture_output=True, text=True, timeout=240)


def test_two_processes_train_every_sample_once_per_epoch_and_resume_exactly(tmp_path, start_model):
    """2 gloo processes x 2 workers over 5 shards of unequal sizes: rank 0 holds more samples than rank 1, and
    each rank runs through its own epochs. Every sample is trained on exactly once per epoch, both ranks end
    with the same weights, and a run killed mid-way resumes to the same losses and weights."""
    sizes = [3, 7, 2, 5, 4]
    data_cfg = {"train": write_sized_shards(tmp_path, sizes), "num_workers": 2, "batch_size": 2}
    train_cfg = {"max_steps": 14, "accumulate": 1, "save_every": 3}
    cfg = make_config(tmp_path, start_model, "whole", data=data_cfg, train=train_cfg)
    proc = torchrun(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg.train.out_dir)
    r0, r1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    init = load_file(str(start_model / saved.WEIGHTS))
    assert not torch.equal(r0["dino_to_llm.weight"], init["dino_to_llm.weight"])
    served = [json.loads((out / f"served{r}.json").read_text()) for r in (0, 1)]
    every = sorted(f"k{s}-{i}" for s, n in enumerate(sizes) for i in range(n))
    done = min(max(e for e, _ in ranks) for ranks in served)  # epochs every rank has finished
    assert done >= 2
    for epoch in range(done):
        keys = [k for ranks in served for e, batch in ranks if e == epoch for k in batch]
        assert sorted(keys) == every, epoch  # each sample exactly once, none lost at a rank's epoch end
    assert len({len([k for e, b in served[r] if e == 0 for k in b]) for r in (0, 1)}) == 2  # unequal shares
    whole = losses(out)

    cut = make_config(tmp_path, start_model, "cut", data=data_cfg, train=train_cfg)
    proc = torchrun(tmp_path, cut, crash=8)  # last checkpoint at step 6
    assert proc.returncode != 0 and len(log_rows(cut.train.out_dir)) == 8
    proc = torchrun(tmp_path, cut)  # resume: auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(cut.train.out_dir) == whole
    a, b = (load_file(str(Path(c.train.out_dir) / "final" / saved.WEIGHTS)) for c in (cfg, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_config_key_fails_before_any_work(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"out_dir": str(tmp_path / "out")}}))
    cmd = [sys.executable, "train.py", "--config", str(config_file), "--set", "train.max_step=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=SINGLE_THREAD, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train.max_step'" in proc.stderr and "max_steps" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """A key renamed in config.py must be renamed in the shipped configs too: loading them checks every key."""
    from config import load_config

    assert load_config(path).train.max_steps > 0


def test_floats_written_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads `1e-2` as a string; a float key takes it, and a word there is still an error."""
    from config import ConfigError, load_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text("optim:\n  lr_llm: 3e-5\n")
    cfg = load_config(config_file, ["optim.lr_connector=1e-2"])
    assert (cfg.optim.lr_llm, cfg.optim.lr_connector) == (3e-5, 1e-2)
    with pytest.raises(ConfigError, match="'optim.lr_connector' must be float, got 'fast'"):
        load_config(config_file, ["optim.lr_connector=fast"])


def test_schedules_at_known_steps():
    peaks = {"connector": 1e-3, "vision": 1e-5, "llm": 2e-5}
    conv = Schedule("converging", max_steps=100, warmup=0.1, target_lr=3e-5, min_lr_ratio=0.0)
    for peak in peaks.values():
        assert conv.lr(0, peak) == pytest.approx(peak / 10)
        assert conv.lr(9, peak) == pytest.approx(peak)  # each group at its own peak after warmup
        assert conv.lr(99, peak) == pytest.approx(3e-5)  # all at the common target at the end
        assert conv.lr(54, peak) == pytest.approx((peak + 3e-5) / 2)  # half-way through the cosine
    cos = Schedule("cosine", max_steps=100, warmup=0.0, target_lr=3e-5, min_lr_ratio=0.1)
    assert cos.lr(99, 1e-3) == pytest.approx(1e-4) and cos.lr(49, 1e-3) == pytest.approx(5.5e-4)
    const = Schedule("constant", max_steps=100, warmup=0.5, target_lr=3e-5, min_lr_ratio=0.0)
    assert const.lr(24, 1e-3) == pytest.approx(5e-4) and const.lr(99, 1e-3) == 1e-3
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr_connector=1e-3, lr_vision=0.0, lr_llm=2e-5))
    assert conv.apply(opt, 9) == {"connector": pytest.approx(1e-3), "llm": pytest.approx(2e-5)}
    assert not any(p.requires_grad for p in model.encoder.dino.parameters())


QUERY_PARAMS = {"q_static", "q_init", "encoder.query_in.weight", "llm_to_query.weight", "llm_to_query.bias"}


def test_lr_query_puts_the_queries_in_a_group_of_their_own():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = lambda opt: {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}  # noqa: E731
    published = groups(build_optimizer(model, OptimConfig(lr_connector=1e-3, lr_vision=0.0, lr_llm=0.0)))
    assert list(published) == ["connector"] and QUERY_PARAMS < published["connector"]  # unset: as before
    split = groups(build_optimizer(model, OptimConfig(lr_connector=1e-3, lr_vision=0.0, lr_llm=0.0, lr_query=1e-4)))
    assert split["query"] == QUERY_PARAMS and split["connector"] == published["connector"] - QUERY_PARAMS
    # lr_query 0 freezes the queries: a step moves the readout and leaves the look bit-identical
    model.train()
    opt = build_optimizer(model, OptimConfig(lr_connector=1e-2, lr_vision=0.0, lr_llm=0.0, lr_query=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fr, fm = frames(2, 2), torch.ones(2, 2, dtype=torch.bool)
    ids = torch.randint(3, 64, (2, 6))
    model(fr, fm, ids, torch.ones_like(ids), labels=ids).loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in QUERY_PARAMS)
    assert not torch.equal(before["dino_to_llm.weight"], after["dino_to_llm.weight"])
    with pytest.raises(Exception, match="'optim.lr_query' is for the foveated model's queries; model.kind mlp"):
        load_config(Path(__file__).parent.parent / "configs" / "toy_mlp.yaml", ["optim.lr_query=1e-4"])


def test_prune_keeps_last_k_and_best_k(tmp_path):
    metrics = {1: 0.5, 2: None, 3: 0.2, 4: 0.9, 5: 0.7, 6: None}
    for step, metric in metrics.items():
        path = ckpt.checkpoint_dir(tmp_path, step)
        path.mkdir(parents=True)
        (path / ckpt.STATE_JSON).write_text(json.dumps({"train_state": {"metric": metric}}))
    (tmp_path / "checkpoints" / ".step-00000007.tmp-x").mkdir()  # staging dir of a killed save
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_best=2)
    kept = ["step-00000001", "step-00000003", "step-00000005", "step-00000006"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == kept  # the staging dir is gone too


SHIPPED_OPTIONS = sorted(
    {
        (m.frames_at, m.glimpses, m.deep_query)
        for m in (load_config(p).model for p in sorted((REPO / "configs").glob("*.yaml")))
        if m.kind == "foveated"
    }
)


@pytest.mark.parametrize("frames_at, glimpses, deep", SHIPPED_OPTIONS)
def test_shipped_model_options_train_on_ragged_batches_and_dpo_starts_at_log2(tokenizer, frames_at, glimpses, deep):
    """Every model option a shipped config sets: a training step on ragged batches (T = [3, 1] and T = [1]) in
    every mode, and DPO's log-ratios 0 at the start (the policy in train mode, its reference in eval)."""
    from inputs.tokenization import chat_ids

    policy = tiny_model(glimpses, deep, tokenizer=tokenizer, frames_at=frames_at).train()
    reference = tiny_model(glimpses, deep, tokenizer=tokenizer, frames_at=frames_at).eval().requires_grad_(False)
    rows = [chat_ids(tokenizer, f"What is in clip {i}?", f"Colour {i}.", stage=2) for i in range(2)]
    text = pad_text([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_token_id)
    for lengths in ([3, 1], [1]):
        b, t = len(lengths), max(lengths)
        fm = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
        batch = {"frames": frames(b, t), "frame_mask": fm, **{k: v[:b] for k, v in text.items()}}
        pairs = {"frames": batch["frames"], "frame_mask": fm}
        for name in ("input_ids", "attention_mask", "labels"):
            pairs[f"chosen_{name}"] = pairs[f"rejected_{name}"] = batch[name]
        for mode in MODES:
            policy.zero_grad(set_to_none=True)
            loss = batch_loss(policy, batch, {"mode": mode})
            loss.backward()
            assert torch.isfinite(loss) and policy.dino_to_llm.weight.grad.abs().sum() > 0, (lengths, mode)
            dpo = batch_loss(policy, pairs, {"mode": mode}, reference, beta=0.1)
            assert dpo.item() == pytest.approx(math.log(2), abs=1e-7), (lengths, mode)
            paired = pair_batch(pairs)
            keys = ("frames", "frame_mask", "input_ids", "attention_mask", "labels")
            with torch.no_grad():
                mine = policy(*(paired[k] for k in keys), mode=mode, rows=paired["rows"]).nll
                theirs = reference(*(paired[k] for k in keys), mode=mode, rows=paired["rows"]).nll
            # the log-ratio is 0: the same weights and inputs in two separate passes, which CI's CPU has once
            # rounded a last bit apart (not reproduced since), so equal to a relative 1e-6 (~15 ulp at 55)
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0, msg=f"{lengths} {mode}")


def write_sized_shards(root: Path, sizes: list[int]) -> str:
    """Shards of unequal sizes, samples with 0-2 frames: keys k<shard>-<i>."""
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(root / f"uneven-{s}.tar")) as sink:
            for i in range(n):
                sample = {"__key__": f"k{s}-{i}", "json": {"user": f"Clip {s}.{i}?", "assistant": f"Answer {i}."}}
                sample.update({f"{f:03d}.jpg": jpeg((30 * s % 256, 40 * i % 256, 90)) for f in range(i % 3)})
                sink.write(sample)
    return str(root / "uneven-*.tar")


def test_the_log_reports_the_mix_it_trained_on(tmp_path, start_model):
    main, extra = write_shards(tmp_path, "main", 2, 6), write_shards(tmp_path, "extra", 1, 4)
    cfg = make_config(
        tmp_path,
        start_model,
        data={"train": [{"path": main, "weight": 0.75}, {"path": extra, "weight": 0.25}], "batch_size": 4},
        train={"max_steps": 2, "accumulate": 1, "save_every": 2},
    )
    train.train(cfg)
    assert [r["mix"] for r in log_rows(cfg.train.out_dir)] == ["0.750/0.250", "0.750/0.250"]


def test_a_resumed_run_says_where_it_resumed_from(tmp_path, start_model, monkeypatch, capsys):
    cfg = make_config(tmp_path, start_model, train={"max_steps": 4})
    with monkeypatch.context() as m:
        crash_after(m, 3)  # last checkpoint at step 2
        with pytest.raises(Crash):
            train.train(cfg)
    assert "resumed from" not in capsys.readouterr().out  # a new run has nothing to say
    train.train(cfg)  # resume: auto
    checkpoint = ckpt.checkpoint_dir(cfg.train.out_dir, 2)
    assert f"resumed from step 2 (checkpoint {checkpoint})\n" in capsys.readouterr().out


def test_a_step_far_slower_than_the_first_ones_warns_once(capsys):
    slow = train.SlowSteps(enabled=True)
    for step, seconds in enumerate([3.0, 1.0, 0.9, 1.1, 1.0, 4.9, 6.0, 60.0, 8.0], 1):  # a slow first, 4.9 < 5x
        slow.see(step, seconds)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: step 7 took 6.0 s, 6x the 1.00 s of the first steps")
    assert f"{torch.get_num_threads()} threads on {os.cpu_count()} CPUs" in lines[0]
    assert "OMP_NUM_THREADS=1" in lines[0]
    quiet = train.SlowSteps(enabled=False)  # ranks but 0, and runs on a GPU
    for step, seconds in enumerate([1.0] * 5 + [60.0], 1):
        quiet.see(step, seconds)
    assert not capsys.readouterr().err


def test_training_warns_of_a_slow_step(tmp_path, start_model, monkeypatch, capsys):
    real = train.Trainer.step

    def step(self):  # the clock of step 4 reads 100x its compute time
        row = real(self)
        if self.state.step == 4:
            row["compute_s"] *= 100
        return row

    monkeypatch.setattr(train.Trainer, "step", step)
    monkeypatch.setattr(train.SlowSteps, "FIRST", 3)
    train.train(make_config(tmp_path, start_model, train={"max_steps": 5, "accumulate": 1, "save_every": 5}))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "OMP_NUM_THREADS=1" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 4 took"), warnings


def test_the_log_keeps_the_loss_terms_apart_and_validates_what_it_trains(tmp_path, start_model, tokenizer):
    """With coarse_weight > 0 the step minimises fine + weight x coarse: log.csv holds that sum as `loss`, its terms
    in their own columns, and validation measures the same sum (val_loss, val_fine_loss, val_coarse_loss), so
    train.best_metric compares like with like. DPO's policy runs no coarse pass: its loss would be thrown away."""
    weight = 0.5
    cfg = make_config(tmp_path, start_model, data={"val": write_shards(tmp_path, "val", 1, 4)},
                      train={"max_steps": 2, "val_every": 1, "val_batches": 2})  # fmt: skip
    cfg.model = dataclasses.replace(cfg.model, coarse_weight=weight)  # a training option: the run's, not the model's
    train.train(cfg)
    with (Path(cfg.train.out_dir) / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        for prefix in ("", "val_"):
            total, fine, coarse = (float(row[f"{prefix}{name}"]) for name in ("loss", "fine_loss", "coarse_loss"))
            assert total == pytest.approx(fine + weight * coarse, rel=1e-5) and fine > 0 and coarse > 0
    policy = tiny_model(tokenizer=tokenizer, coarse_weight=1.0).train()
    rows_ = [chat_ids(tokenizer, "What is it?", "Red.", stage=2)]
    text = pad_text([r[0] for r in rows_], [r[1] for r in rows_], tokenizer.pad_token_id)
    pairs = {"frames": frames(1, 2), "frame_mask": torch.ones(1, 2, dtype=torch.bool)}
    for name in ("input_ids", "attention_mask", "labels"):
        pairs[f"chosen_{name}"] = pairs[f"rejected_{name}"] = text[name]
    calls = []
    hook = policy.llm.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    batch_loss(policy, pairs, {"mode": "coarse_fine"}, policy, beta=0.1)
    hook.remove()
    assert len(calls) == 2 * 2  # policy and reference: two passes of coarse_fine each, no third for a coarse loss
