"""Results files: one JSON record a line, appended as each question is answered, so an interrupted evaluation
resumes where it stopped (`benchmark.py`, captioning, the toy run)."""

from __future__ import annotations

import json
from pathlib import Path


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
