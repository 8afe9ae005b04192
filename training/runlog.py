"""The training log: one CSV row per optimizer step in out_dir/log.csv, mirrored to wandb when enabled.

wandb is imported only when `train.wandb` is offline or online, so that a missing package is reported at
start-up, before any model is loaded. A run continued from a checkpoint continues its wandb run: its id is kept in
out_dir/wandb_run.json, and the rows wandb already holds are not sent again.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from config import Config, to_dict
from training.optim import GROUPS

COLUMNS = [
    "step", "epoch", "loss", "val_loss", *(f"lr_{g}" for g in (*GROUPS, "query")),  # query: with optim.lr_query
    "fine_loss", "coarse_loss", "val_fine_loss", "val_coarse_loss",  # the loss's terms, where it has two
    "samples_per_s", "tokens_per_s", "data_s", "compute_s", "skipped", "nonfinite", "mix",
]  # fmt: skip
WANDB_RUN = "wandb_run.json"  # in out_dir: {"id": ...} of the run's wandb run

# out_dir -> its wandb run, opened in this process and not yet finished: a run that failed with an exception
# leaves it open, and wandb refuses to open a run id that is still in use, as its continuation must
_unfinished: dict[Path, Any] = {}


class RunLog:
    def __init__(self, cfg: Config, enabled: bool = True) -> None:
        """`enabled` is False on every process but rank 0."""
        self.cfg, self.enabled = cfg, enabled
        self.out = Path(cfg.train.out_dir)
        self.path = self.out / "log.csv"
        self.file = self.writer = self.wandb = self.run = None
        self.sent = 0  # the last step the wandb run already holds
        if cfg.train.wandb != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    f"train.wandb is '{cfg.train.wandb}' but wandb is not installed: "
                    "pip install wandb, or set train.wandb=disabled"
                ) from e
            self.wandb = wandb

    def start(self, step: int) -> None:
        """Open the log of a run that has done `step` steps, dropping rows a killed run wrote past them."""
        if not self.enabled:
            return
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        logged = max((int(r["step"]) for r in rows), default=0)
        rows = [r for r in rows if int(r["step"]) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")  # rewritten aside: a kill now loses no row
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, COLUMNS)
        if self.wandb is not None:
            self._start_wandb(step, logged)

    def _start_wandb(self, step: int, logged: int) -> None:
        """A new wandb run, or, for a run continued from a checkpoint, the one out_dir names, so that wandb shows
        one run whose steps go on. The steps redone after the checkpoint (up to `logged`, the CSV's last row before
        the stop) are the ones the stopped run sent, with the same losses: they are not sent twice."""
        key = self.out.resolve()
        left = _unfinished.pop(key, None)
        if left is not None:  # this run stopped on an exception in this very process: close what it logged
            left.finish(exit_code=1)
        saved = self.out / WANDB_RUN
        run_id = json.loads(saved.read_text())["id"] if step and saved.is_file() else None
        self.run = self.wandb.init(
            project=self.cfg.train.wandb_project,
            mode=self.cfg.train.wandb,
            dir=str(self.out),
            name=self.out.name,
            config=to_dict(self.cfg),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",  # runs trained together (train_together) log side by side
        )
        _unfinished[key] = self.run
        self.sent = logged if run_id else 0
        if run_id is None:
            tmp = saved.with_name(saved.name + ".tmp")
            tmp.write_text(json.dumps({"id": self.run.id}) + "\n")
            os.replace(tmp, saved)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow(row)
        self.file.flush()
        if self.run is not None and row["step"] > self.sent:
            self.run.log(row, step=row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.run is not None:
            self.run.finish()
            _unfinished.pop(self.out.resolve(), None)
            self.run = None
