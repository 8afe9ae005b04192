"""The training log: one CSV row per optimizer step in out_dir/log.csv, mirrored to wandb when enabled.

wandb is optional: it is imported only when `train.wandb` is offline or online, and a missing package
is reported at start-up, before any model is loaded.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from config import Config, to_dict
from training.optim import GROUPS

COLUMNS = [
    "step", "epoch", "loss", "val_loss", *(f"lr_{g}" for g in (*GROUPS, "query")),  # query: with optim.lr_query
    "samples_per_s", "tokens_per_s", "data_s", "compute_s", "skipped", "nonfinite", "mix",
]  # fmt: skip


class RunLog:
    def __init__(self, cfg: Config, enabled: bool = True) -> None:
        """`enabled` is False on every process but rank 0."""
        self.cfg, self.enabled = cfg, enabled
        self.path = Path(cfg.train.out_dir) / "log.csv"
        self.file = self.writer = self.wandb = None
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
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
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
            self.wandb.init(
                project=self.cfg.train.wandb_project,
                mode=self.cfg.train.wandb,
                dir=self.cfg.train.out_dir,
                name=Path(self.cfg.train.out_dir).name,
                config=to_dict(self.cfg),
            )

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow(row)
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None and self.enabled:
            self.wandb.finish()
