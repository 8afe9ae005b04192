"""The run's log as wandb receives it: `train.wandb: offline` on a tiny model (CPU, fp32), read back from the
offline run directory with wandb's own reader, through a stop and a resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from conftest import Crash, jpeg

import train
from config import Config, from_dict
from tests.tiny import IMAGE
from training.runlog import WANDB_RUN, RunLog

pytestmark = pytest.mark.usefixtures("single_thread")
# columns whose values a resumed run repeats exactly (the timings of a redone step are its own)
EXACT = ["step", "epoch", "loss", "lr_connector", "lr_vision", "lr_llm", "skipped", "nonfinite", "mix"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb's settings, caches and service logs under tmp_path, never in the user's home; its service is
    stopped afterwards so that no later test inherits these directories."""
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = pytest.importorskip("wandb")
    yield
    wandb.teardown()


def make_config(tmp: Path, start: Path, **train_options) -> Config:
    with wds.TarWriter(str(tmp / "train-0.tar")) as sink:
        for i in range(10):
            sample = {"__key__": f"s{i:03d}", "json": {"user": f"What is in clip {i}?", "assistant": f"Colour {i}."}}
            if i % 3:
                sample.update({f"{f:03d}.jpg": jpeg((25 * i % 256, 40 * f, 90)) for f in range(1 + i % 3)})
            sink.write(sample)
    data = {"train": str(tmp / "train-*.tar"), "batch_size": 2, "frame_size": IMAGE, "max_frames": 4}
    data.update(max_text_len=48, num_workers=0, shuffle_buffer=4, stage=2)
    options = {"init_from": str(start), "max_steps": 6, "accumulate": 2, "save_every": 2, "keep_last": 2}
    options.update(keep_best=0, out_dir=str(tmp / "run"), wandb="offline", **train_options)
    optim = {"lr_connector": 1e-2, "lr_vision": 1e-3, "lr_llm": 1e-3, "schedule": "cosine", "warmup": 0.2}
    return from_dict(Config, {"data": data, "optim": optim, "train": options})


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline run's transaction log (run-<id>.wandb), as wandb itself parses them:
    `wandb leet inspect --json` runs wandb-core's reader of the file, one JSON record per line."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_offline_wandb_holds_the_config_and_every_row_and_a_resume_continues_its_run(
    tmp_path, start_model, monkeypatch, offline_wandb
):
    cfg = make_config(tmp_path, start_model)
    out = Path(cfg.train.out_dir)
    real = train.Trainer.step

    def step(self):
        if self.state.step == 5:  # 5 steps done and logged; the last checkpoint is at step 4
            raise Crash
        return real(self)

    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "step", step)
        with pytest.raises(Crash):
            train.train(cfg)
    run_id = json.loads((out / WANDB_RUN).read_text())["id"]
    train.train(cfg)  # resume: auto, from step 4

    with (out / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 7)]
    segments = sorted(out.glob("wandb/offline-run-*"))  # one per process run; wandb syncs them as one run
    assert len(segments) == 2 and all(run_id in p.name for p in segments)
    records = [wandb_records(p) for p in segments]
    runs = [r["run"] for rs in records for r in rs if r["type"] == "run"]
    assert [r["run_id"] for r in runs] == [run_id, run_id]
    assert runs[0]["config"]["update"]["train"]["resume"] == "auto"
    config = {k: v for k, v in runs[0]["config"]["update"].items() if k != "_wandb"}
    assert config == yaml.safe_load((out / "config.yaml").read_text())  # the resolved config, model included

    stopped, resumed = (history(rs) for rs in records)
    assert [h["step"] for h in stopped] == [1, 2, 3, 4, 5]
    assert [h["step"] for h in resumed] == [6]  # step 5, redone after the checkpoint, is not sent twice
    assert [h["_step"] for h in stopped + resumed] == [1, 2, 3, 4, 5, 6]
    for row, item in zip(rows, stopped + resumed, strict=True):
        assert {k for k, v in row.items() if v != ""} == {k for k in item if not k.startswith("_")}
        for key in EXACT:
            assert row[key] == item[key] if key == "mix" else float(row[key]) == item[key], (row["step"], key)
    assert [r["exit"]["exit_code"] for rs in records for r in rs if r["type"] == "exit"] == [1, 0]


def test_a_new_run_opens_a_new_wandb_run(tmp_path, offline_wandb):
    """Only a run continued from a checkpoint continues a wandb run: one started afresh in the same out_dir
    (no checkpoint yet) is another run, and its rows must not be dropped as already sent."""
    cfg = from_dict(Config, {"train": {"out_dir": str(tmp_path / "run"), "wandb": "offline"}})
    ids = []
    for _ in range(2):
        log = RunLog(cfg)
        log.start(0)
        log.write({"step": 1, "loss": 0.5})
        log.close()
        ids.append(json.loads((tmp_path / "run" / WANDB_RUN).read_text())["id"])
    assert ids[0] != ids[1]
    segments = sorted((tmp_path / "run").glob("wandb/offline-run-*"))
    assert [[h["step"] for h in history(wandb_records(p))] for p in segments] == [[1], [1]]


def test_runs_trained_together_log_to_wandb_side_by_side(tmp_path, offline_wandb):
    """train_together keeps one log per run open at once: each row goes to its own run's wandb run."""
    logs = [RunLog(from_dict(Config, {"train": {"out_dir": str(tmp_path / n), "wandb": "offline"}})) for n in "ab"]
    for log in logs:
        log.start(0)
    for step in (1, 2):
        for i, log in enumerate(logs):
            log.write({"step": step, "loss": float(10 * i + step)})
    for log in logs:
        log.close()
    for i, name in enumerate("ab"):
        (segment,) = (tmp_path / name).glob("wandb/offline-run-*")
        assert [(h["step"], h["loss"]) for h in history(wandb_records(segment))] == [(1, 10 * i + 1), (2, 10 * i + 2)]


def test_wandb_missing_is_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(RuntimeError, match="pip install wandb"):
        RunLog(from_dict(Config, {"train": {"out_dir": str(tmp_path), "wandb": "offline"}}))
    RunLog(from_dict(Config, {"train": {"out_dir": str(tmp_path)}}))  # disabled: wandb is never imported
