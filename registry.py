"""The kinds of model, by name: build a new one from its backbones, or load any saved directory.

`load(dir)` returns the right model for every directory the project saves (its config.json names the kind);
`new_model(config)` builds the kind `config` describes around pretrained backbones (weights.py resolves hub
ids, local directories and the packaged offline copies). Adding a connector kind: its module under
connectors/, its options dataclass in config.py, and its line in connectors.CONNECTORS.
"""

from __future__ import annotations

from pathlib import Path

import weights
from config import ChatModelConfig, FoveatedConfig, ModelConfig, SmolVLMConfig, TowerModelConfig
from frames import FrameSpec
from vlm import VLM


def model_class(kind: str) -> type[VLM]:
    """The model class of a kind (every connector kind is a ConnectorVLM)."""
    from connector_vlm import ConnectorVLM
    from connectors import CONNECTORS
    from model import FoveatedVLM
    from smolvlm import SmolVLM

    classes: dict[str, type[VLM]] = {"foveated": FoveatedVLM, "smolvlm": SmolVLM}
    classes.update({name: ConnectorVLM for name in CONNECTORS})
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind]


def new_model(config: ModelConfig, frames: FrameSpec | None = None) -> VLM:
    """A new model of config's kind around pretrained backbones, its new parts freshly initialised."""
    cls = model_class(config.kind)
    if isinstance(config, SmolVLMConfig):
        return cls.from_hub(config, frames)
    assert isinstance(config, ChatModelConfig)
    llm, tokenizer = weights.load_llm(config.llm), weights.load_tokenizer(config.llm)
    if isinstance(config, FoveatedConfig):
        return cls(config, weights.load_dino(config.dino), llm, tokenizer, frames)
    assert isinstance(config, TowerModelConfig)
    from towers import VisionTower

    return cls(config, VisionTower(weights.load_tower(config.tower)), llm, tokenizer, frames)


def load(path: str | Path) -> VLM:
    """Any saved model directory (checkpoint.py's layout) -> its model, in eval mode on the CPU."""
    import checkpoint

    return checkpoint.load_model(path)
