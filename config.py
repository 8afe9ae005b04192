"""One typed configuration for every run, filled from YAML and `--set a.b=c` overrides.

Unknown keys fail before any work starts, with the nearest valid key suggested, because a
misspelt option that silently keeps its default wastes a whole training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from connectors import TokenLearnerQFormerConfig


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


FAMILIES = ("foveated", "smolvlm")


@dataclass
class ModelConfig:
    """Which model family train.py trains (families.py) and, for the foveated model, which backbones and the
    shape of the query loop."""

    family: str = "foveated"  # foveated (FoveatedVLM on shards) | smolvlm (the `smolvlm` section, on TextVQA)
    dino: str = "facebook/dinov2-small"  # hub id, local dir, or "packaged"
    llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id, local dir, or "packaged"
    query_dim: int = 384
    visual_scale: float = 0.14  # SmolLM2's input-embedding std: visual tokens enter at text scale
    deep_query: bool = True  # query through every DINO layer; False = one cross-attention (ablation)
    glimpses: int = 1  # queries (and so tokens) per frame
    frames_at: str = "start"  # start: before all text (published) | user_turn: inside the first user turn

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"'model.family' must be one of {FAMILIES}, got '{self.family}'")
        if self.frames_at not in ("start", "user_turn"):
            raise ConfigError(f"'model.frames_at' must be 'start' or 'user_turn', got '{self.frames_at}'")


@dataclass
class SmolVLMConfig:
    """model.family smolvlm without train.init_from: a pretrained SmolVLM whose connector is replaced by a
    new TokenLearner-QFormer (smolvlm.py). The remaining connector sizes keep their SmolVLM-256M defaults."""

    hub: str = "HuggingFaceTB/SmolVLM-256M-Instruct"  # hub id or local dir of an Idefics3 model + processor
    num_queries: int = TokenLearnerQFormerConfig.num_queries  # S tokens per image; the processor follows
    num_tokens: int = TokenLearnerQFormerConfig.num_tokens  # T TokenLearner tokens the Q-Former reads
    version: str = TokenLearnerQFormerConfig.version  # TokenLearner 1.1 (MLP + softmax) | 1 (convs + sigmoid)
    num_layers: int = TokenLearnerQFormerConfig.num_layers  # Q-Former blocks

    def __post_init__(self) -> None:
        if self.version not in ("1", "1.1"):
            raise ConfigError(f"'smolvlm.version' must be '1' or '1.1', got '{self.version}'")
        for key in ("num_queries", "num_tokens", "num_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'smolvlm.{key}' must be >= 1, got {getattr(self, key)}")


@dataclass
class OptimConfig:
    """AdamW with one learning rate per parameter group (connector, vision, llm); 0 freezes the group."""

    lr_connector: float = 1e-3
    lr_vision: float = 1e-5  # the vision tower: DINOv2 (foveated) or SigLIP (smolvlm)
    lr_llm: float = 1e-5
    schedule: str = "converging"  # constant | linear | cosine | converging (see schedule.py)
    warmup: float = 0.03  # fraction of max_steps spent warming up linearly
    target_lr: float = 3e-5  # converging: the rate every group ends at
    min_lr_ratio: float = 0.0  # linear, cosine: the end rate as a fraction of each group's peak
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping

    def __post_init__(self) -> None:
        from schedule import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"'optim.schedule' must be one of {SCHEDULES}, got '{self.schedule}'")
        if min(self.lr_connector, self.lr_vision, self.lr_llm) < 0:
            raise ConfigError("'optim.lr_*' must be >= 0 (0 freezes the group)")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"'optim.warmup' is a fraction of max_steps in [0, 1), got {self.warmup}")


@dataclass
class TrainConfig:
    """The training loop, its validation, checkpoints and logs."""

    mode: str = "coarse_fine"  # forward mode of the foveated model (model.MODES)
    init_from: str = ""  # a saved model dir (e.g. stage 1's final/); empty = new connector on `model`'s backbones
    max_steps: int = 1000  # optimizer steps; the data is read in as many epochs as that takes
    epochs: int = 0  # > 0: instead of max_steps, this many passes over a dataset of known size (TextVQA)
    accumulate: int = 1  # micro-batches per optimizer step (per process)
    bf16: bool = True  # bf16 autocast, on CUDA only
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False
    dpo_beta: float = 0.1  # stage 3
    val_every: int = 0  # optimizer steps between validations; 0 = never
    val_batches: int = 50  # batches per validation (per process)
    save_every: int = 500  # optimizer steps between checkpoints (a last one is written at the end)
    keep_last: int = 2  # newest checkpoints kept
    keep_best: int = 0  # checkpoints also kept for the lowest `best_metric`
    best_metric: str = "val_loss"  # val_loss | loss (the training loss of the step)
    resume: str = "auto"  # auto (newest checkpoint in out_dir, if any) | none | a checkpoint dir
    out_dir: str = "runs/fvlm"
    seed: int = 0
    wandb: str = "disabled"  # disabled | offline | online (the CSV log is always written)
    wandb_project: str = "fvlm"

    def __post_init__(self) -> None:
        from model import MODES  # imported here: model.py imports this module

        choices = {"mode": MODES, "best_metric": ("val_loss", "loss"), "wandb": ("disabled", "offline", "online")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"'train.{key}' must be one of {valid}, got '{getattr(self, key)}'")
        for key in ("max_steps", "accumulate", "save_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'train.{key}' must be >= 1, got {getattr(self, key)}")
        if self.epochs < 0:
            raise ConfigError(f"'train.epochs' must be >= 0, got {self.epochs}")
        validated = self.val_every and self.save_every % self.val_every == 0
        if self.keep_best and self.best_metric == "val_loss" and not validated:
            raise ConfigError("'train.keep_best' by val_loss needs 'train.save_every' a multiple of 'train.val_every'")


@dataclass
class DataConfig:
    """WebDataset shards → batches (data.py; shard specs are globs or brace lists: "a-{000..099}.tar"), or
    for the smolvlm family TextVQA → batches (textvqa.py)."""

    textvqa: str = ""  # TextVQA root in its published layout (smolvlm family): JSONs + train_images/
    subset: int = 0  # TextVQA: train on this many questions (a seeded choice, the same every epoch); 0 = all

    train_shards: str | list[str] = ""
    val_shards: str | list[str] | None = None
    text_shards: str | list[str] | None = None  # text-only retention data mixed into training
    text_ratio: float = 0.0  # fraction of training samples drawn from text_shards (published: 0.14)
    stage: int = 1  # 1: loss on all text, 2: answer-only loss, 3: DPO pairs (chosen/rejected)
    batch_size: int = 8
    frame_budget: int | None = None  # cap on batch_size × longest clip per batch; None = no cap
    max_frames: int = 64
    fps: float | None = None  # None: max_frames spread over the whole clip; else this rate, capped
    frame_size: int = 224
    replicate_image_frames: int = 8  # an image becomes a still clip of this many frames
    max_text_len: int = 1024  # tokens; longer samples are truncated on the right
    num_workers: int = 2
    shuffle_buffer: int = 256  # samples per worker; 0 = none (shard order is still shuffled by epoch)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"'data.stage' must be 1, 2 or 3, got {self.stage}")
        if not 0.0 <= self.text_ratio < 1.0:
            raise ConfigError(f"'data.text_ratio' must be in [0, 1), got {self.text_ratio}")
        if self.text_ratio > 0 and not self.text_shards:
            raise ConfigError("'data.text_ratio' > 0 needs 'data.text_shards'")
        if self.subset < 0:
            raise ConfigError(f"'data.subset' must be >= 0, got {self.subset}")
        if self.frame_budget is not None and self.frame_budget < self.max_frames:
            raise ConfigError(f"'data.frame_budget' ({self.frame_budget}) is below 'data.max_frames'")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    smolvlm: SmolVLMConfig = field(default_factory=SmolVLMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return from_dict(hint, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"'{where}' must be {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{where}{key}'{_suggest(key, names)}")
    return cls(**{k: _coerce(v, hints[k], where + k) for k, v in data.items()})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b=c` override in place; the value is parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key.sub=value")
    path, raw = assignment.split("=", 1)
    *parents, leaf = path.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{assignment}': '{p}' is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a mapping at the top level")
    for o in overrides:
        apply_override(data, o)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
