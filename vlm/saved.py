"""Model directories: saving and reading models as directories of safetensors + JSON (never pickle).

A directory is written beside its final name and renamed into place, so a run killed mid-save
leaves the previous directory intact.

Model directory (any kind; `read_model` needs nothing else, and no sniffing):
  config.json          {"kind", "model": the kind's options, "frames": how it is fed, "backbones": their configs}
  model.safetensors    every weight but the LoRA adapters (tied weights stored once)
  adapter.safetensors  the LoRA adapter weights, when the model has them
  tokenizer/           the tokenizer (SmolVLM: processor/, its Idefics3 processor)

Nothing here knows a concrete model: a directory is written from the base interface (kind, config, frames,
backbone configs, state dict, tokenizer) and read into a `Saved`, which the kind's class builds itself from
(`VLM.from_saved`); `registry.load` picks the class by the kind the directory names. A training checkpoint
(training/checkpoints.py) holds one of these directories.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, Idefics3Processor

from cli import UserError
from config import ConfigError, from_dict, model_config
from inputs.frames import FrameSpec
from vlm.lora import is_lora_param

WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer"
PROCESSOR = "processor"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` directory to `final`, replacing what was there."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, adapter) state tensors; a tensor shared under several names (tied embeddings) is kept once."""
    base, adapter, seen = {}, {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        (adapter if is_lora_param(name) else base)[name] = t.detach().cpu().contiguous()
    return base, adapter


def write_model(model: Any, out: Path) -> None:
    """Write weights, configs and tokenizer (or processor) into an existing directory."""
    config = {
        "kind": model.kind,
        "model": asdict(model.config),
        "frames": asdict(model.frames),
        "backbones": model.backbone_configs(),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    base, adapter = _tensors(model)
    save_file(base, str(out / WEIGHTS), metadata={"kind": model.kind})
    if adapter:
        save_file(adapter, str(out / ADAPTER))
    processor = getattr(model, "processor", None)
    if processor is not None:
        processor.save_pretrained(out / PROCESSOR)
    elif model.tokenizer is not None:
        model.tokenizer.save_pretrained(out / TOKENIZER)


def save_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a staging directory with `write(dir)`, then rename it to `path`."""
    path = Path(path)
    tmp = staging_dir(path)
    try:
        write(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_model(src: Path, out: Path) -> None:
    """Fill an existing directory with the model directory `src` as hard links (copies where the filesystem has
    none): a run's final model is its last checkpoint's, so it costs no second write of the weights. Safe because
    no file here is ever rewritten in place; deleting the checkpoint leaves the links whole."""
    for f in sorted(src.rglob("*")):
        target = out / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def save_model(model: Any, path: str | Path) -> None:
    save_atomic(path, lambda out: write_model(model, out))


def _legacy(saved: dict) -> dict:
    """A directory written before model kinds existed (a FoveatedVLM with "dino" / "llm" beside "model")."""
    if "kind" in saved or "dino" not in saved:
        return saved
    options = {k: v for k, v in saved["model"].items() if k not in ("family", "token_norm")}
    if saved["model"].get("token_norm", "none") != "none":
        raise ValueError("this model was trained with model.token_norm: batch, which no longer exists")
    return {"kind": "foveated", "model": {"kind": "foveated", **options}, "frames": saved.get("frames", {}),
            "backbones": {"dino": saved["dino"], "llm": saved["llm"]}}  # fmt: skip


def _read(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / name} is damaged or incomplete ({e}): train again or use another checkpoint") from e


def is_ours(path: Path) -> bool:
    """A directory this project wrote: its config.json names the kind (or is the legacy foveated one)."""
    try:
        saved = json.loads((path / CONFIG).read_text())
    except OSError:
        return False
    except json.JSONDecodeError:
        return True  # ours, damaged: the normal path says so
    return not isinstance(saved, dict) or "kind" in saved or "dino" in saved


def strict_fit(source: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` if it is exactly `model`'s (a name of tied tensors stands for all of them), else a one-line error."""
    expected = model.state_dict().keys()
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    ties: dict[int, set[str]] = {}  # names of one tensor (tied embeddings): loading any of them loads all
    for name, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), set()).add(name)
    loaded = {n for names in ties.values() if names & state.keys() for n in names}
    missing = [k for k in missing if k not in loaded]
    if missing or unexpected:
        raise UserError(f"{source} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return state


@dataclass
class Saved:
    """A saved model as read from disk, before any model is built: what `VLM.from_saved` builds and fills.

    A foreign checkpoint's adapter (release.py) returns one too, with its own `fit` (renaming checked strictly)."""

    kind: str
    config: Any  # the kind's options dataclass
    frames: FrameSpec
    backbones: dict[str, dict]  # the backbones' transformers configs, by name
    text: Any  # the tokenizer, SmolVLM's processor, or None
    state: dict[str, torch.Tensor]
    source: Path  # the weights, for messages
    fit: Callable[[Path, nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] = strict_fit

    def state_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The state dict to load into `model`, built from this checkpoint's shapes; an error if it does not fit."""
        return self.fit(self.source, model, self.state)


class Adapter(Protocol):
    """A foreign checkpoint layout read as one of our kinds (the published fVLM: release.py)."""

    def matches(self, source: str | Path) -> bool: ...

    def read(self, source: str | Path) -> Saved: ...


def read_model(path: str | Path, adapters: Iterable[Adapter] = ()) -> Saved:
    """A saved model directory, or a foreign checkpoint one of `adapters` recognises. Our own directories are read
    first and unsniffed: an adapter is asked only about what is not ours."""
    if not is_ours(Path(path)):
        for adapter in adapters:
            if adapter.matches(path):
                return adapter.read(path)
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a saved model: expected {CONFIG} and {WEIGHTS} in it")
    try:
        saved = _legacy(json.loads((path / CONFIG).read_text()))
        kind, backbones = saved["kind"], saved["backbones"]
        config = model_config(saved["model"])
        frames = from_dict(FrameSpec, saved.get("frames", {}), "frames.")
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise UserError(f"{path / CONFIG} is malformed: {e}") from e
    if (path / PROCESSOR).is_dir():  # SmolVLM: the Idefics3 processor, which holds the tokenizer
        text = Idefics3Processor.from_pretrained(path / PROCESSOR)
    else:
        text = AutoTokenizer.from_pretrained(path / TOKENIZER) if (path / TOKENIZER).is_dir() else None
    state = _read(path, WEIGHTS)
    if (path / ADAPTER).is_file():
        state.update(_read(path, ADAPTER))
    return Saved(kind, config, frames, backbones, text, state, path / WEIGHTS)
