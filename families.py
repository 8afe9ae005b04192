"""The model families train.py trains, behind one small interface, so the loop holds no model internals.

- foveated: FoveatedVLM (model.py) on WebDataset shards (data.py); the model carries its tokenizer;
  stage 3 is DPO against a frozen reference copy.
- smolvlm: SmolVLM with the TokenLearner-QFormer connector (smolvlm.py) on TextVQA (textvqa.py), with
  its Idefics3 processor; answer-only cross-entropy.

A family gives the loop: the model with its `processor` (what turns raw samples into model inputs: the
tokenizer, or the Idefics3 processor), how to save both, each parameter's learning-rate group
(connector | vision | llm), the data loader (same resume contract: an epoch's batches after its first
`skip_batches`), a batch's loss and its samples/tokens for the log. Each family rejects, at construction,
the config keys that only the other one reads, so a run never silently ignores an option.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

import checkpoint as ckpt
import data
import optim
import smolvlm
import textvqa
from config import Config, ConfigError
from frames import FrameSpec
from losses import batch_loss
from model import FoveatedVLM


class Family(Protocol):
    """What the training loop asks of a model family."""

    def new(self) -> tuple[nn.Module, Any]: ...  # (model, processor) from the config, when train.init_from is empty
    def load(self, path: Path) -> tuple[nn.Module, Any]: ...  # (model, processor) of a saved directory
    def write(self, model: nn.Module, processor: Any, directory: Path) -> None: ...  # into an existing directory
    def group_of(self, name: str) -> str: ...  # a parameter's learning-rate group (optim.GROUPS)
    def checkpoint_activations(self, model: nn.Module) -> None: ...
    def loader(
        self, processor: Any, rank: int, world_size: int, epoch: int = 0, skip_batches: int = 0, split: str = "train"
    ) -> Iterator[dict]: ...  # collated tensors + `keys` + `skipped` counts (data.py's contract)
    def epoch_batches(self, world_size: int) -> int: ...  # per rank; for train.epochs
    def loss(self, model: nn.Module, batch: dict[str, Tensor], reference: nn.Module | None) -> Tensor: ...
    def counts(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[int, int]: ...  # (samples, LLM tokens)
    def finish(self, model: nn.Module, processor: Any) -> None: ...  # after the final save, on rank 0


def batch_counts(batch: dict[str, Tensor], glimpses: int) -> tuple[int, int]:
    """(samples, LLM tokens) of a foveated batch: text tokens of every sequence plus one token per frame per
    glimpse."""
    text = sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
    return batch["frames"].shape[0], text + int(batch["frame_mask"].sum()) * glimpses


def _reject(family: str, keys: dict[str, object]) -> None:
    """Refuse a set key that `family` would ignore."""
    for key, value in keys.items():
        if value:
            raise ConfigError(f"'{key}' is not read by model.family {family}")


class Foveated:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        d = cfg.data
        _reject("foveated", {"data.textvqa": d.textvqa, "data.subset": d.subset, "train.epochs": cfg.train.epochs})
        if cfg.train.val_every and not cfg.data.val_shards:
            raise ConfigError("'train.val_every' > 0 needs 'data.val_shards'")

    def new(self) -> tuple[FoveatedVLM, Any]:
        model = FoveatedVLM.from_backbones(self.cfg.model)
        model.frames = self._frames()
        return model, model.tokenizer

    def load(self, path: Path) -> tuple[FoveatedVLM, Any]:
        model = FoveatedVLM.from_pretrained(path)
        if model.tokenizer is None:
            raise ValueError(f"the model in {path} carries no tokenizer; the data pipeline needs one")
        model.frames = self._frames()
        return model, model.tokenizer

    def _frames(self) -> FrameSpec:
        """How this run feeds clips, saved with the model so that every command reads media the same way."""
        d = self.cfg.data
        return FrameSpec(d.frame_size, d.max_frames, d.replicate_image_frames, d.fps)

    def write(self, model: FoveatedVLM, processor: Any, directory: Path) -> None:
        ckpt.write_model(model, directory)  # the tokenizer is saved as part of the model

    def group_of(self, name: str) -> str:
        return optim.group_of(name)

    def checkpoint_activations(self, model: FoveatedVLM) -> None:
        model.checkpoint_activations()

    def loader(
        self, processor: Any, rank: int, world_size: int, epoch: int = 0, skip_batches: int = 0, split: str = "train"
    ) -> Iterator[dict]:
        return data.make_loader(self.cfg.data, processor, rank, world_size, epoch, skip_batches, split)

    def epoch_batches(self, world_size: int) -> int:
        raise ConfigError("shards have no known size: set 'train.max_steps', not 'train.epochs'")

    def loss(self, model: nn.Module, batch: dict[str, Tensor], reference: nn.Module | None) -> Tensor:
        tc = self.cfg.train
        return batch_loss(model, batch, tc.mode, reference, tc.dpo_beta)

    def counts(self, model: FoveatedVLM, batch: dict[str, Tensor]) -> tuple[int, int]:
        return batch_counts(batch, model.config.glimpses)

    def finish(self, model: FoveatedVLM, processor: Any) -> None:
        pass


class SmolVLM:
    """Trains in fp32 weights (bf16 autocast on CUDA with train.bf16): AdamW steps of 1e-5 vanish in bf16."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, d = cfg, cfg.data
        _reject("smolvlm", {f"data.{key}": getattr(d, key) for key in ("train_shards", "val_shards", "text_shards")})
        if d.stage != 2:
            raise ConfigError(f"model.family smolvlm trains answers only: set 'data.stage' to 2, not {d.stage}")
        splits = ("train", "val") if cfg.train.val_every else ("train",)
        for path in (Path(d.textvqa) / textvqa.FILES[split] for split in splits):
            if not d.textvqa or not path.is_file():
                raise ConfigError(f"model.family smolvlm trains on TextVQA: 'data.textvqa' must hold {path.name}")

    def new(self) -> tuple[nn.Module, Any]:
        connector = asdict(self.cfg.smolvlm)  # the section's other keys are TokenLearnerQFormerConfig fields
        return smolvlm.from_hub(connector.pop("hub"), torch.float32, **connector)

    def load(self, path: Path) -> tuple[nn.Module, Any]:
        model, processor = smolvlm.load_pretrained(path)
        return model.float(), processor

    def write(self, model: nn.Module, processor: Any, directory: Path) -> None:
        smolvlm.save_pretrained(model, processor, directory)

    def group_of(self, name: str) -> str:
        return smolvlm.group_of(name)

    def checkpoint_activations(self, model: nn.Module) -> None:
        model.activation_checkpointing_enable({"use_reentrant": False})

    def loader(
        self, processor: Any, rank: int, world_size: int, epoch: int = 0, skip_batches: int = 0, split: str = "train"
    ) -> Iterator[dict]:
        return textvqa.make_loader(self.cfg.data, processor, rank, world_size, epoch, skip_batches, split)

    def epoch_batches(self, world_size: int) -> int:
        return textvqa.epoch_batches(self.cfg.data, world_size)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], reference: nn.Module | None) -> Tensor:
        return model(**batch, use_cache=False).loss  # labels -100 outside the answers

    def counts(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[int, int]:
        return batch["input_ids"].shape[0], int(batch["attention_mask"].sum())  # <image> tokens included

    def finish(self, model: nn.Module, processor: Any) -> None:
        """The seed's example inference: one validation question, when the val file is there."""
        if (Path(self.cfg.data.textvqa) / textvqa.FILES["val"]).is_file():
            textvqa.show_example(model, processor, self.cfg.data.textvqa)


BY_NAME: dict[str, type] = {"foveated": Foveated, "smolvlm": SmolVLM}  # config.FAMILIES


def for_config(cfg: Config) -> Family:
    """The family that `model.family` names, after checking the config keys it reads."""
    return BY_NAME[cfg.model.family](cfg)
