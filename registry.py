"""The kinds of model, by name: build a new one from its backbones, or load any saved directory.

`load(dir)` returns the right model for every directory the project saves (its config.json names the kind) and
for the foreign checkpoints a kind has an adapter for (the published fVLM); `new_model(config)` builds the kind
`config` describes around pretrained backbones (vlm/weights.py resolves hub ids, local directories and the
packaged offline copies). This module and the commands are the only ones that know every kind. Adding a
connector kind: its module under connectors/, its options dataclass in config.py, and its line in
connectors.CONNECTORS.
"""

from __future__ import annotations

from pathlib import Path

from config import ModelConfig
from connectors import CONNECTORS
from connectors.smolvlm import SmolVLM
from connectors.tower_vlm import TowerVLM
from inputs.frames import FrameSpec
from model import FoveatedVLM
from vlm import saved
from vlm.base import VLM

CLASSES: dict[str, type[VLM]] = {"foveated": FoveatedVLM, "smolvlm": SmolVLM, **dict.fromkeys(CONNECTORS, TowerVLM)}
ADAPTERS = tuple(adapter for cls in dict.fromkeys(CLASSES.values()) for adapter in cls.adapters)


def model_class(kind: str) -> type[VLM]:
    """The model class of a kind (every connector kind is a TowerVLM)."""
    if kind not in CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(CLASSES)}")
    return CLASSES[kind]


def new_model(config: ModelConfig, frames: FrameSpec | None = None) -> VLM:
    """A new model of config's kind around pretrained backbones, its new parts freshly initialised."""
    return model_class(config.kind).from_backbones(config, frames)


def load(path: str | Path) -> VLM:
    """Any saved model directory (vlm/saved.py's layout), or a foreign checkpoint one kind adapts -> its model, in
    eval mode on the CPU."""
    s = saved.read_model(path, ADAPTERS)
    return model_class(s.kind).from_saved(s)
