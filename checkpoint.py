"""Saving and loading models as directories of safetensors + JSON (never pickle).

A directory is written beside its final name and renamed into place, so a run killed mid-save
leaves the previous directory intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Dinov2Config, Dinov2Model

from config import ModelConfig, from_dict
from model import FoveatedVLM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer"


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


def write_model(model: FoveatedVLM, out: Path) -> None:
    """Write weights, configs and tokenizer into an existing directory."""
    config = {
        "model": asdict(model.config),
        "dino": model.encoder.dino.config.to_dict(),
        "llm": model.llm.config.to_dict(),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    save_weights(model, str(out / WEIGHTS))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out / TOKENIZER)


def save_model(model: FoveatedVLM, path: str | Path) -> None:
    path = Path(path)
    tmp = staging_dir(path)
    try:
        write_model(model, tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(path: str | Path) -> FoveatedVLM:
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a saved FoveatedVLM: expected {CONFIG} and {WEIGHTS} in it")
    try:
        config = json.loads((path / CONFIG).read_text())
        model_config = from_dict(ModelConfig, config["model"], "model.")
        dino = Dinov2Model(Dinov2Config.from_dict(config["dino"]))
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config["llm"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG} is malformed: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER) if (path / TOKENIZER).is_dir() else None
    model = FoveatedVLM(model_config, dino, llm, tokenizer)
    missing, unexpected = load_weights(model, str(path / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS} does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()
