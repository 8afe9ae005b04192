"""Fault injection: kill -9 mid-training and mid-checkpoint, a full disk, NaN losses, a dead DDP process, data
storms, and every command's one-line error for each kind of bad input. Tiny models on the CPU, fp32.

Each test states the faults it injects; the README's "what survives what" table quotes these figures.
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from conftest import jpeg, mp4
from safetensors.torch import load_file
from tqdm import tqdm

import app
import bench
import benchmark
import chat
import cli
import compare
import data
import prepare
import registry
import toyworld
import train
from cli import UserError
from tests.test_train import REPO, SINGLE_THREAD, config_yaml, log_rows, losses, make_config, write_shards
from training import checkpoints as ckpt
from vlm import saved

KILLS = 20  # kill -9 in a row, each followed by resume: auto


pytestmark = pytest.mark.usefixtures("single_thread")


def fp32(tmp: Path, start: Path, out: str, **train_opts) -> train.Config:
    """A run whose every number is reproducible bit for bit: fp32, one step per batch, a checkpoint each step."""
    opts = {"bf16": False, "accumulate": 1, "save_every": 1, "keep_last": 2, "max_steps": 8, **train_opts}
    return make_config(tmp, start, out, train=opts, optim={"schedule": "cosine"})


def weights_of(out_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "final" / saved.WEIGHTS))


def assert_loadable(out_dir: str | Path) -> int:
    """Every checkpoint in out_dir is whole (its files match their digests) and its weights load; how many."""
    found = ckpt.list_checkpoints(out_dir)
    for path in found:
        assert ckpt.damage(path) is None, path
        assert all(torch.isfinite(t).all() for t in load_file(str(path / ckpt.MODEL_DIR / saved.WEIGHTS)).values())
    return len(found)


def command(script: str, *argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """One of the project's commands, run as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / script), *argv], cwd=REPO, env=env or SINGLE_THREAD,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


# ---- kill -9, again and again --------------------------------------------------------------------------------


def _train_in_child(config: str) -> None:
    # the progress bar's lock is a semaphore that a fork shares with its parent: a child killed while holding
    # it would leave every later run (and the parent) waiting on it forever, so each child takes its own
    tqdm.set_lock(threading.RLock())
    train.main(["--config", config])


def test_kill_9_twenty_times_then_resume_gives_the_uninterrupted_run(tmp_path, start_model):
    """SIGKILL at random moments (mid-step, mid-checkpoint, mid-prune), 20 times in a row, each time followed
    by `resume: auto`: the logged losses and the final weights equal an uninterrupted run's bit for bit, and
    after every kill each checkpoint on disk is whole and loadable. The runs are forked from this process (its
    imports done), so that twenty restarts take seconds; SIGKILL gives them no chance to clean up either way."""
    steps = 80
    whole = fp32(tmp_path, start_model, "whole", max_steps=steps)
    began = time.perf_counter()
    train.train(whole)
    step_s = (time.perf_counter() - began) / steps  # a step and its checkpoint, on this machine
    cut = fp32(tmp_path, start_model, "cut", max_steps=steps)
    config = tmp_path / "cut.yaml"
    config.write_text(config_yaml(cut))
    out = Path(cut.train.out_dir)
    fork = multiprocessing.get_context("fork")
    rng, kills, mid_save, newest = random.Random(0), 0, 0, []
    while kills < KILLS:
        before = len(log_rows(out)) if (out / "log.csv").is_file() else 0
        child = fork.Process(target=_train_in_child, args=(str(config),))
        child.start()
        deadline = time.time() + 60
        while time.time() < deadline and child.is_alive():  # a step of progress, then a random moment
            if (out / "log.csv").is_file() and len(log_rows(out)) > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5 * step_s))  # about two steps a kill: twenty fit on any machine's speed
        assert child.is_alive(), f"the run ended (exit {child.exitcode}) before kill {kills + 1}"
        had = len(ckpt.list_checkpoints(out))  # the step's log row comes before its checkpoint: maybe none yet
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        kills += 1
        mid_save += any(p.name.startswith(".") for p in (out / ckpt.CHECKPOINTS).glob("*"))  # a staging dir left
        assert assert_loadable(out) >= min(had, 1), "a kill left no whole checkpoint where there was one"
        found = ckpt.list_checkpoints(out)
        newest.append(int(found[-1].name.split("-")[1]) if found else 0)
    train.train(cut)  # the 21st start runs to the end
    assert losses(out) == losses(whole.train.out_dir)
    a, b = weights_of(whole.train.out_dir), weights_of(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert mid_save >= 1, "no kill landed mid-checkpoint: the test lost its point"
    print(f"{kills} kills, {mid_save} of them mid-checkpoint; the newest checkpoint after each: {newest}")


# ---- a full disk ----------------------------------------------------------------------------------------------


def test_a_full_disk_mid_checkpoint_is_one_clear_error_and_the_previous_checkpoint_survives(
    tmp_path, start_model, monkeypatch, capsys
):
    """The disk fills up half-way through the third checkpoint's weights file: one line naming the file, exit
    2, no staging directory left, the earlier checkpoints whole; once space is back the run resumes to the
    uninterrupted losses and weights."""
    whole = fp32(tmp_path, start_model, "whole")
    train.train(whole)
    cut = fp32(tmp_path, start_model, "cut")
    config = tmp_path / "cut.yaml"
    config.write_text(config_yaml(cut))
    real, calls = saved.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 5:  # checkpoints write model + state tensors: the 5th file is step 3's weights
            real(tensors, filename, metadata)
            os.truncate(filename, 1000)  # as far as the space went
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata)

    monkeypatch.setattr(saved, "save_file", full_disk)  # a checkpoint's model directory
    monkeypatch.setattr(ckpt, "save_file", full_disk)  # and its optimizer state
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--config", str(config)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no space left on the device while writing ") and "model.safetensors" in err, err
    out = Path(cut.train.out_dir)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert assert_loadable(out) == 2
    assert not [p for p in (out / ckpt.CHECKPOINTS).iterdir() if p.name.startswith(".")]
    registry.load(ckpt.list_checkpoints(out)[-1] / ckpt.MODEL_DIR)
    monkeypatch.setattr(ckpt, "save_file", real)
    train.train(cut)  # resume: auto, from step 2
    assert losses(out) == losses(whole.train.out_dir)
    a, b = weights_of(whole.train.out_dir), weights_of(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(tmp_path, start_model, capsys):
    cfg = fp32(tmp_path, start_model, "run", max_steps=4)
    train.train(cfg)
    out = Path(cfg.train.out_dir)
    newest = ckpt.list_checkpoints(out)[-1]
    weights = newest / ckpt.MODEL_DIR / saved.WEIGHTS
    os.truncate(weights, weights.stat().st_size // 2)  # what a dying disk or a half-copied directory leaves
    assert "is truncated" in ckpt.damage(newest)
    assert train.find_resume(cfg) == ckpt.list_checkpoints(out)[-2]
    assert f"not resuming from {newest.name}" in capsys.readouterr().err


# ---- NaN and inf -----------------------------------------------------------------------------------------------


def poison(monkeypatch, steps: set[int], value: float = math.nan) -> None:
    """Multiply the loss of the given (1-based) steps by NaN or inf: every gradient goes non-finite too."""
    real = train.Trainer.losses

    def losses(self, model, batch):
        out = real(self, model, batch)
        return {k: v * value for k, v in out.items()} if self.state.step + 1 in steps else out

    monkeypatch.setattr(train.Trainer, "losses", losses)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_step_is_skipped_counted_and_never_reaches_the_weights(tmp_path, start_model, monkeypatch, value):
    cfg = fp32(tmp_path, start_model, "run", max_steps=6, keep_last=10)
    poison(monkeypatch, {3, 5}, value)
    train.train(cfg)
    rows = log_rows(cfg.train.out_dir)
    assert [int(r["nonfinite"]) for r in rows] == [0, 0, 1, 0, 1, 0]
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 7)]  # training went on
    out = Path(cfg.train.out_dir)
    assert assert_loadable(out) == 6
    step = {p.name: load_file(str(p / ckpt.MODEL_DIR / saved.WEIGHTS)) for p in ckpt.list_checkpoints(out)}
    state = {p.name: load_file(str(p / ckpt.STATE_TENSORS)) for p in ckpt.list_checkpoints(out)}
    for skipped, before in (("step-00000003", "step-00000002"), ("step-00000005", "step-00000004")):
        assert all(torch.equal(step[skipped][k], step[before][k]) for k in step[before])  # no update at all
        assert all(torch.equal(state[skipped][k], state[before][k]) for k in state[before] if "rng" not in k)
    moved = step["step-00000004"]["dino_to_llm.weight"]
    assert not torch.equal(moved, step["step-00000003"]["dino_to_llm.weight"])  # the next step trained
    assert all(torch.isfinite(t).all() for t in weights_of(out).values())


def test_non_finite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, start_model, monkeypatch, capsys):
    cfg = fp32(tmp_path, start_model, "run", max_steps=10, max_nonfinite=3)
    config = tmp_path / "run.yaml"
    config.write_text(config_yaml(cfg))
    poison(monkeypatch, set(range(4, 11)))
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--config", str(config)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 6: the loss or gradient was NaN/inf in 3 steps in a row"), err
    assert "train.max_nonfinite" in err
    rows = log_rows(cfg.train.out_dir)
    assert [int(r["nonfinite"]) for r in rows] == [0, 0, 0, 1, 1]
    assert assert_loadable(cfg.train.out_dir) == 2  # steps 4 and 5: finite, equal to step 3's


# ---- a dead DDP process --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_ddp_process_stops_the_other_with_a_clear_error(tmp_path, start_model):
    """Two gloo processes; rank 1 gets SIGKILL mid-run. Rank 0 exits within a bounded time (the broken
    connection, else train.ddp_timeout) with one line naming the step, not a hang or a backend traceback."""
    cfg = make_config(tmp_path, start_model, "run", data={"batch_size": 1},
                      train={"max_steps": 500, "accumulate": 1, "save_every": 100, "ddp_timeout": 30})  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(config_yaml(cfg))
    env = {**SINGLE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen([sys.executable, "train.py", "--config", str(config)], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in (0, 1)
    ]  # fmt: skip
    try:
        log = Path(cfg.train.out_dir) / "log.csv"
        deadline = time.time() + 120
        while not (log.is_file() and len(log.read_text().splitlines()) > 3):
            assert time.time() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-2000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        rc = procs[0].wait(timeout=90)
        waited = time.time() - killed
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
    assert rc == 2 and waited < 60, (rc, waited, err[-2000:])
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 lost the other processes at step ") and "train.resume=auto" in last
    print(f"rank 0 stopped {waited:.1f} s after rank 1 was killed")


# ---- data storms ---------------------------------------------------------------------------------------------


def bad_samples(n: int) -> list[dict]:
    """n undecodable samples, cycling through the ways a shard goes wrong."""
    ok = {"user": "What is it?", "assistant": "Nothing."}
    clip = mp4(num_frames=6)
    kinds = [
        {"json": ok, "000.jpg": b"\xff\xd8\xff\xe0 not a jpeg"},  # corrupt JPEG
        {"json": ok, "mp4": clip[: len(clip) // 2]},  # truncated mp4
        {"json": b'{"user": "What is', "000.jpg": jpeg((9, 9, 9))},  # malformed JSON
        {"json": ok, "000.jpg": b""},  # an empty media member
        {"json": b"", "000.jpg": jpeg((9, 9, 9))},  # an empty JSON member
    ]
    return [{"__key__": f"bad{i:03d}", **kinds[i % len(kinds)]} for i in range(n)]


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_data_storm_every_good_sample_once_per_epoch_and_every_bad_one_counted(
    tmp_path, start_model, monkeypatch, fraction
):
    total, shards = 20, 2
    n_bad = round(fraction * total)
    bad, good = bad_samples(n_bad), [f"good{i:03d}" for i in range(total - n_bad)]
    for s in range(shards):  # bad samples spread over both shards, shuffled in; each shard ends on a good one
        members = bad[s::shards] + [
            {"__key__": k, "json": {"user": "What?", "assistant": f"Clip {k}."}, "000.jpg": jpeg((50, 90, 9))}
            for k in good[s::shards]
        ]
        random.Random(s).shuffle(members)
        g = next(i for i, m in enumerate(members) if m["__key__"].startswith("good"))
        members[g], members[-1] = members[-1], members[g]  # a shard's bad tail would be counted in the next epoch
        with wds.TarWriter(str(tmp_path / f"storm-{s}.tar")) as sink:
            for m in members:
                sink.write(m)
    served, real = [], data.make_loader

    def recorded(cfg, processor, rank=0, world_size=1, epoch=0, skip_batches=0, split="train"):
        for batch in real(cfg, processor, rank, world_size, epoch, skip_batches, split):
            if split == "train":
                served.append((epoch, list(batch["keys"])))
            yield batch

    monkeypatch.setattr(data, "make_loader", recorded)
    storm = {"train": str(tmp_path / "storm-*.tar"), "batch_size": 1, "shuffle_buffer": 0}
    cfg = make_config(tmp_path, start_model, "run", data=storm,
                      train={"max_steps": 2 * len(good) + 1, "accumulate": 1, "save_every": 100})  # fmt: skip
    train.train(cfg)
    rows = log_rows(cfg.train.out_dir)
    for epoch in (0, 1):
        keys = sorted(k for e, batch in served if e == epoch for k in batch)
        assert keys == sorted(good), epoch  # each good sample exactly once, no bad one
        assert sum(int(r["skipped"]) for r in rows if int(r["epoch"]) == epoch) == n_bad, epoch


# ---- every command's one-line error --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, start_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "syntax.yaml").write_text("train: {max_steps: 3\n")
    (root / "unknown.yaml").write_text(yaml.safe_dump({"train": {"max_step": 3}}))
    (root / "broken.mp4").write_bytes(random.Random(0).randbytes(3000))
    truncated = root / "truncated"
    truncated.mkdir()
    for f in start_model.iterdir():
        if f.is_file():
            (truncated / f.name).write_bytes(f.read_bytes())
        else:
            os.symlink(f, truncated / f.name)
    weights = truncated / saved.WEIGHTS
    os.truncate(weights, weights.stat().st_size // 2)
    occupied = make_config(root, start_model, "occupied", train={"max_steps": 1, "save_every": 1, "bf16": False})
    train.train(occupied)
    occupied.train.resume = "none"
    (root / "occupied.yaml").write_text(config_yaml(occupied))
    damaged = ckpt.list_checkpoints(occupied.train.out_dir)[-1]
    resume = make_config(root, start_model, "again", train={"resume": str(damaged), "max_steps": 2})
    (root / "resume-damaged.yaml").write_text(config_yaml(resume))
    state = damaged / ckpt.STATE_TENSORS
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, the size unchanged
    state.write_bytes(bytes(raw))
    write_shards(root, "training", 1, 2)  # not evaluation samples: no options, no answers
    (root / "run.yaml").write_text(config_yaml(make_config(root, start_model, "fresh")))
    absent = make_config(root, start_model, "absent", data={"train": str(root / "absent-{000..003}.tar")})
    (root / "absent-shards.yaml").write_text(config_yaml(absent))
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(6)]  # fmt: skip
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prepare.main(["smoltalk", "--in", str(root / "chat.jsonl"), "--out", str(root / "prepared"), "--shard-size", "4"])
    (root / "videos.json").write_text(json.dumps([{"videoid": 1, "name": "a clip"}]))  # WebVid's fields, not its CSV
    (root / "header-only.csv").write_text("videoid,contentUrl,duration,page_dir,name\n")
    with wds.TarWriter(str(root / "eval-0.tar")) as sink:
        sink.write({"__key__": "q0", "json": {"question": "Colour?", "options": ["red", "blue"], "answer": "A"},
                    "000.jpg": jpeg((200, 0, 0))})  # fmt: skip
    return {"root": root, "model": start_model, "truncated": truncated}


UNKNOWN_KEY = "unknown config key 'train.max_step'; did you mean 'max_steps'?"
SET_TYPO = "--set train.max_step=3: unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"
WEBVID_LAYOUT = "prepare.py webvid reads `results_2M_train.csv` / `results_10M_train.csv` (and `_val`) with columns"
CASES = {
    "yaml syntax": (["train.py", "--config", "{root}/syntax.yaml"], "is not valid YAML at line 2"),
    "unknown key": (["train.py", "--config", "{root}/unknown.yaml"], UNKNOWN_KEY),
    "no config": (["train.py", "--config", "{root}/absent.yaml"], "cannot read config {root}/absent.yaml"),
    "occupied out_dir": (["train.py", "--config", "{root}/occupied.yaml"], "already holds checkpoints"),
    "damaged resume": (["train.py", "--config", "{root}/resume-damaged.yaml"], "state.safetensors is altered"),
    "no model": (["chat.py", "Hi?", "--model", "{root}/nowhere"], "{root}/nowhere is not a saved model"),
    "truncated weights": (["chat.py", "Hi?", "--model", "{truncated}"], "model.safetensors is damaged or incomplete"),
    "undecodable video": (["chat.py", "Hi?", "--model", "{model}", "--media", "{root}/broken.mp4"],
                          "cannot decode video {root}/broken.mp4"),
    "missing media": (["chat.py", "Hi?", "--model", "{model}", "--media", "{root}/gone.jpg"],
                      "{root}/gone.jpg: no such file"),
    "missing video": (["chat.py", "Hi?", "--model", "{model}", "--media", "{root}/gone.mp4"],
                      "{root}/gone.mp4: no such file"),
    "chat bad read": (["chat.py", "Hi?", "--model", "{model}", "--read", "autoregresive"],
                      "reads in ['coarse_only', 'coarse_fine', 'autoregressive'], not 'autoregresive'"),
    "benchmark data missing": (["benchmark.py", "--model", "{model}", "--bench", "mvbench", "--data-root",
                                "{root}/nodata"], "Expected layout"),
    "benchmark model missing": (["benchmark.py", "--model", "{root}/nowhere", "--bench", "shards", "--data-root",
                                 "{root}/eval-*.tar", "--out", "{root}/eval"], "is not a saved model"),
    "benchmark malformed shards": (["benchmark.py", "--model", "{model}", "--bench", "shards", "--data-root",
                                    "{root}/training-*.tar"], "training-0.tar: sample training0000: an evaluation "
                                   "sample needs 'options' (2 or more) or 'answers'"),
    "prepare source missing": (["prepare.py", "openvid", "--in", "{root}/none.csv", "--out", "{root}/prep"],
                               "{root}/none.csv: No such file or directory"),
    "unknown key in the yaml, set fine": (["train.py", "--config", "{root}/unknown.yaml", "--set", "train.seed=1"],
                                          "{root}/unknown.yaml: " + UNKNOWN_KEY),
    "set typo": (["train.py", "--config", "{root}/run.yaml", "--set", "train.max_step=3"], SET_TYPO),
    "set without a value": (["train.py", "--config", "{root}/run.yaml", "--set", "train.max_steps"],
                            "--set train.max_steps: must look like key.sub=value"),
    "set bad value": (["train.py", "--config", "{root}/run.yaml", "--set", "train.max_steps=0"],
                      "--set train.max_steps=0: 'train.max_steps' must be >= 1, got 0"),
    "shards missing": (["train.py", "--config", "{root}/absent-shards.yaml"],
                       "no shard at {root}/absent-000.tar (4 of the 4 that"),
    "prepare other options": (["prepare.py", "smoltalk", "--in", "{root}/chat.jsonl", "--out", "{root}/prepared",
                               "--shard-size", "2", "--drop-system"],
                              "{root}/prepared holds a conversion made with other options (--shard-size 4 there, 2 "
                              "now; --drop-system not given there, given now): give another --out, or the same "
                              "options to continue it"),
    "prepare wrong layout": (["prepare.py", "webvid", "--in", "{root}/videos.json", "--out", "{root}/webvid"],
                             "{root}/videos.json is not a CSV with the columns videoid, name: its first line reads "
                             "'[{{\"videoid\": 1, \"name\": \"a clip\"}}]'. " + WEBVID_LAYOUT),
    "prepare no records": (["prepare.py", "webvid", "--in", "{root}/header-only.csv", "--out", "{root}/webvid-empty"],
                           "{root}/header-only.csv holds no webvid record. " + WEBVID_LAYOUT),
    "toy run bad key": (["toyworld.py", "run", "--set", "train.max_step=3"], SET_TYPO),
    "compare bad key": (["compare.py", "--rows", "mlp", "--set", "optim.lr=1"],
                        "--set optim.lr=1: unknown config key 'optim.lr' (did you mean 'optim.lr_llm'?)"),
    "bench unknown kind": (["bench.py", "--kind", "nonsense", "--only", "inference"], "nonsense"),
    "app no model": (["app.py", "--model", "{root}/nowhere"], "{root}/nowhere"),
}  # fmt: skip


SCRIPTS = {"train.py": train, "chat.py": chat, "benchmark.py": benchmark, "prepare.py": prepare,
           "toyworld.py": toyworld, "compare.py": compare, "bench.py": bench, "app.py": app}  # fmt: skip


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.replace(" ", "-"))
def test_each_command_fails_with_one_line_naming_the_problem(bad_inputs, case, monkeypatch, capsys):
    """Each bad input through the command's own entry (cli.run of its main), from the user's directory."""
    argv, wanted = CASES[case]
    argv, wanted = [a.format(**bad_inputs) for a in argv], wanted.format(**bad_inputs)
    monkeypatch.chdir(REPO if argv[0] == "toyworld.py" else bad_inputs["root"])
    with pytest.raises(SystemExit) as e:
        cli.run(SCRIPTS[argv[0]].main, argv[1:])
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    assert wanted in last_line(err), last_line(err)


ONE_LINE = {"set typo", "toy run bad key", "compare bad key", "shards missing", "prepare other options",
            "prepare wrong layout", "prepare no records", "undecodable video", "missing video", "chat bad read",
            "benchmark data missing", "prepare source missing", "yaml syntax", "app no model"}  # fmt: skip
# (bench unknown kind is argparse's usage error: the usage, then its one line)


def test_the_commands_fail_so_from_a_shell_too(bad_inputs):
    """One case per command as a separate process, all at once (their imports overlap), and the cases whose one
    line was once a traceback, a flood of warnings or no error at all: the exit status and stderr a shell sees."""
    cases = ["yaml syntax", "undecodable video", "benchmark data missing", "prepare source missing",
             "toy run bad key", "compare bad key", "bench unknown kind", "app no model", "set typo",
             "shards missing", "prepare other options", "prepare wrong layout", "prepare no records",
             "missing video", "chat bad read"]  # fmt: skip
    before = {p.name: p.read_bytes() for p in (bad_inputs["root"] / "prepared").iterdir()}
    procs = {}
    for case in cases:
        argv = [a.format(**bad_inputs) for a in CASES[case][0]]
        cwd = REPO if argv[0] == "toyworld.py" else bad_inputs["root"]
        procs[case] = subprocess.Popen([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=cwd, env=SINGLE_THREAD,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2 and "Traceback" not in err, (case, err[-2000:])
        if case in ONE_LINE:  # nothing else on stderr (decoders of the other cases print their own complaints)
            assert len(err.strip().splitlines()) == 1, (case, err[-2000:])
        assert CASES[case][1].format(**bad_inputs) in last_line(err), (case, last_line(err))
    after = {p.name: p.read_bytes() for p in (bad_inputs["root"] / "prepared").iterdir()}
    assert after == before  # the refused rerun lost nothing of the conversion there


def test_debug_shows_the_traceback(bad_inputs, capsys):
    with pytest.raises(UserError):
        cli.run(chat.main, ["Hi?", "--model", str(bad_inputs["truncated"]), "--debug"])
    proc = command("chat.py", "Hi?", "--model", str(bad_inputs["truncated"]), env={**SINGLE_THREAD, "FVLM_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SafetensorError" in proc.stderr
