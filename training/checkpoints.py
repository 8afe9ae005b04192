"""Training checkpoints: what a run needs to continue exactly, written atomically beside its model directory.

Layout (out_dir/checkpoints/step-00000100/):
  model/              a model directory (vlm/saved.py)
  state.safetensors   optimizer tensors `optim.<param index>.<name>` and RNG states `rng.<rank>.<name>`
  state.json          TrainState (step, every rank's data position, metric), optimizer hyperparameters, RNG scalars,
                      and the size and digest of every other file (a checkpoint is whole when they match)
  config.yaml         the resolved run config
A checkpoint directory exists under its final name only once complete, so the newest one is usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from config import Config, save_config
from vlm.saved import save_atomic

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
RUN_CONFIG = "config.yaml"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainState:
    """Where a run stands after `step` optimizer steps: enough to continue it exactly."""

    step: int = 0
    epoch: int = 0  # this process's epoch: ranks hold different shards and move on when their own run dry
    batches: int = 0  # batches this process has consumed in `epoch`: the loader resumes after them
    metric: float | None = None  # this checkpoint's value of train.best_metric, if known
    world_size: int = 1  # the data split depends on it
    positions: list[list[int]] | None = None  # [epoch, batches] of every rank, by rank, as saved
    scaler: dict | None = None  # an fp16 run's gradient scaler (its scale and growth count), as saved


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states (torch, CUDA device, numpy, python) as tensors + JSON-able scalars."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return tensors, {"numpy": [kind, pos, has_gauss, cached], "python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (staging and half-deleted dirs have other names)."""
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if _STEP_DIR.fullmatch(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name)[1]))


def save_training(
    path: Path,
    write: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    rngs: list[tuple[dict[str, torch.Tensor], dict]],
    config: Config,
    optim: dict | None = None,
) -> None:
    """Write a training checkpoint atomically; `write(dir)` saves the model into an existing directory and
    `rngs` holds every process's rng_state(), by rank. `optim`: the optimizer's state dict when the optimizer
    holds only shards of it (FSDP: gathered whole, numbered as `optimizer.state_dict()` numbers it)."""
    optim = optimizer.state_dict() if optim is None else optim
    tensors, scalars = {}, {}
    for index, slot in optim["state"].items():
        for name, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    for rank, (rng_tensors, _) in enumerate(rngs):
        tensors.update({f"rng.{rank}.{name}": t for name, t in rng_tensors.items()})
    meta = {
        "train_state": asdict(state),
        "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
        "rng": [m for _, m in rngs],
    }

    def write_all(tmp: Path) -> None:
        (tmp / MODEL_DIR).mkdir()
        write(tmp / MODEL_DIR)
        save_file(tensors, str(tmp / STATE_TENSORS))
        save_config(config, tmp / RUN_CONFIG)
        meta["files"] = _digests(tmp)  # written last: a checkpoint is whole when its files match these
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))

    save_atomic(path, write_all)


def _digests(root: Path) -> dict[str, list]:
    """[size, sha256] of every file under root but state.json, by relative path."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != STATE_JSON):
        h = hashlib.sha256()
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
        out[str(f.relative_to(root))] = [f.stat().st_size, h.hexdigest()]
    return out


def damage(path: Path) -> str | None:
    """Why a training checkpoint cannot be resumed from (a missing, truncated or altered file), or None."""
    try:
        meta = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{path / STATE_JSON} is unreadable ({e})"
    files = meta.get("files")
    if files is None:
        return None  # written before checkpoints carried digests
    found = _digests(path)
    for name, digest in files.items():
        if name not in found:
            return f"{path / name} is missing"
        if found[name] != digest:
            what = "truncated" if found[name][0] != digest[0] else "altered"
            return f"{path / name} is {what} (size {found[name][0]}, expected {digest[0]})"
    return None


def load_training(
    path: Path,
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    world_size: int = 1,
    load: Callable[[dict], None] | None = None,
) -> TrainState:
    """Restore the optimizer and this rank's RNG states from a checkpoint (the model is loaded from
    path/model by the caller) and return where the run stood. `load(state_dict)` puts the whole optimizer state
    into an optimizer that holds shards of it (FSDP); default `optimizer.load_state_dict`."""
    meta = json.loads((path / STATE_JSON).read_text())
    state = TrainState(**meta["train_state"])
    if state.world_size != world_size:
        raise ValueError(
            f"{path} was written by {state.world_size} processes, this run has {world_size}: the data split "
            f"differs, so the run cannot continue exactly; start a new one with train.init_from={path / MODEL_DIR}"
        )
    if state.positions is not None:
        state.epoch, state.batches = state.positions[rank]
    tensors = load_file(str(path / STATE_TENSORS))
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "optim":
            slots.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer"]["scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    (load or optimizer.load_state_dict)({"state": slots, "param_groups": meta["optimizer"]["param_groups"]})
    prefix = f"rng.{rank}."
    set_rng_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["rng"][rank])
    return state


def prune_checkpoints(out_dir: str | Path, keep_last: int, keep_best: int) -> None:
    """Delete all checkpoints but the newest `keep_last` and the `keep_best` with the lowest metric.

    A doomed checkpoint is first renamed out of the `step-N` namespace, so a crash mid-delete never
    leaves a half-deleted directory that looks complete. Call it only while no save is in flight.
    """
    found = list_checkpoints(out_dir)
    metrics = {p: json.loads((p / STATE_JSON).read_text())["train_state"]["metric"] for p in found}
    ranked = sorted((p for p in found if metrics[p] is not None), key=lambda p: metrics[p])
    keep = set(found[-keep_last:] if keep_last else []) | set(ranked[:keep_best])
    for p in found:
        if p not in keep:
            os.replace(p, p.with_name(f".{p.name}.deleting"))
    for leftover in (Path(out_dir) / CHECKPOINTS).glob(".*"):  # also staging dirs of killed saves
        shutil.rmtree(leftover, ignore_errors=True)
