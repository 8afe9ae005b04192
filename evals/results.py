"""Results files: one JSON record a line, appended as each question is answered, so an interrupted evaluation
resumes where it stopped (`benchmark.py`, the toy run; captioning checks its settings per record).

A results file belongs to one model and one setting (benchmark, protocol, prompt variant, precision, frame
settings), written beside it as `<stem>.setting.json` before the first record: a later run resumes it only with the
same setting, and is refused in one line otherwise, so one model's answers are never reported as another's. The
model is named by a digest of its weights as loaded, whatever path it came from.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cli import UserError

EVAL_ROOT = Path("runs/eval")


def read_predictions(path: Path) -> dict[str, dict]:
    """Records by id, the last one winning; a line cut short by a crash is ignored."""
    records: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["id"]] = record
    return records


def weights_digest(model: nn.Module) -> str:
    """A digest of every tensor of the model's state (names, shapes, dtypes, bytes): the same model however it was
    loaded or named, another one as soon as one weight differs."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def default_out(model: str | Path) -> Path:
    """runs/eval/<the model's path, or hub id, with separators as underscores>: two models never share one (every
    run's model is called `final`, so its last name alone would)."""
    path = Path(model)
    if path.exists():
        path = path.resolve()
        try:
            path = path.relative_to(Path.cwd().resolve())
        except ValueError:
            pass
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(path).strip("/")).strip("_") or "model"
    return EVAL_ROOT / name


def claim(stem: Path, setting: dict[str, Any]) -> None:
    """Make `stem.jsonl` this setting's: a new file takes it, a file of the same setting resumes, anything else
    (another model, benchmark, protocol, precision or frame setting, or records without a setting) is refused."""
    records, record = stem.with_suffix(".jsonl"), stem.with_suffix(".setting.json")
    setting = json.loads(json.dumps(setting))  # as it reads back (tuples as lists)
    if record.is_file():
        found = json.loads(record.read_text())
        if found != setting:
            differ = sorted(k for k in {*found, *setting} if found.get(k) != setting.get(k))
            raise UserError(
                f"{records} holds answers of another setting (differing in {', '.join(differ)}): give this run "
                f"another --out, or delete {records} and {record} to start over"
            )
        return
    if records.is_file() and records.stat().st_size:
        raise UserError(f"{records} holds answers of an unknown model and setting: give this run another --out")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(setting, indent=1))
