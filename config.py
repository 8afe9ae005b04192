"""One typed configuration for every run, filled from YAML and `--set a.b=c` overrides.

Unknown keys fail before any work starts, with the nearest valid key suggested, because a misspelt option
that silently keeps its default wastes a whole training run. The `model:` section is a tagged union: it is
parsed as the dataclass of the kind it names (`model.kind`), so an option of another kind is an unknown key
too; the data sources (`data.train`, `data.val`) are tagged the same way by their `kind`.

This module imports nothing of the project: every layer reads it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from cli import UserError

LLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DINO_HUB_ID = "facebook/dinov2-small"
MODES = ("coarse_only", "coarse_fine", "autoregressive")  # the foveated model's ways to read
SCHEDULES = ("constant", "linear", "cosine", "converging")


class ConfigError(UserError, ValueError):
    """A configuration file or override that cannot be used as written."""


def _choice(where: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"'{where}' must be one of {valid}, got {value!r}")


# ---- models --------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM's projections (trained in the llm group; the base LLM weights stay frozen)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module name suffixes

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"'model.lora.r' must be >= 1, got {self.r}")
        if not self.targets:
            raise ConfigError("'model.lora.targets' is empty: name at least one projection, e.g. [q_proj, v_proj]")


FRAMES_AT = ("start", "user_turn", "after_question")  # where the frames go in the text (vlm/base.py's layout)


@dataclass
class ModelConfig:
    """What every kind has; a kind's own dataclass adds its options (see KINDS)."""

    kinds: ClassVar[dict[str, type[ModelConfig]]] = {}
    kind: str = "foveated"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        default = cls.__dict__.get("kind")
        if isinstance(default, str):  # a concrete kind: registered under its name
            ModelConfig.kinds[default] = cls

    def __post_init__(self) -> None:
        expected = type(self).__dict__.get("kind")
        if self.kind != expected:
            raise ConfigError(f"'model.kind' {self.kind!r} given to the options of kind {expected!r}")


@dataclass
class ChatModelConfig(ModelConfig):
    """Kinds whose visual tokens go before the text of a chat LLM (or inside its first user turn)."""

    llm: str = LLM_HUB_ID  # hub id, local dir, or "packaged"
    # start: before all text (published) | user_turn: inside the first user turn, before its words |
    # after_question: after the first user turn's words, so a read can depend on what is asked
    frames_at: str = "start"
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model.frames_at", self.frames_at, FRAMES_AT)


@dataclass
class FoveatedConfig(ChatModelConfig):
    """The foveated model: one token per frame and glimpse, the LLM choosing where the next frame is read."""

    kind: str = "foveated"
    dino: str = DINO_HUB_ID  # hub id, local dir, or "packaged"
    query_dim: int = 384
    visual_scale: float = 0.14  # SmolLM2's input-embedding std: visual tokens enter at text scale
    deep_query: bool = True  # query through every DINO layer; False = one cross-attention (ablation)
    glimpses: int = 1  # queries (and so tokens) per frame
    mode: str = "coarse_fine"  # the forward mode training uses; evaluation picks its own
    # random (published) | coarse: the fine queries start out as the static one (llm_to_query's weight 0, its
    # bias and q_init copies of q_static), so a fine read begins as the glance and learns where to move from it
    fine_start: str = "random"
    # random (published) | cls: the static query (and the first frame's fine query) start as the one whose read
    # is DINOv2's CLS token, so the glance begins as the backbone's summary of the frame and learns from there
    query_start: str = "random"
    coarse_weight: float = 0.0  # λ: loss = fine + λ·coarse (an extra LLM pass over the coarse tokens); 0 published
    # fine reads in the parallel modes (published: 1, its queries written from the coarse read). Each further one
    # reads with queries written from the previous fine read, as inference's are: one LLM pass over the frames
    # more per pass; as many passes as frames equals the autoregressive read exactly
    fine_passes: int = 1
    # how frames_at after_question steers the fine reads from the question's last state: shared (frame 0's query
    # written by llm_to_query, the head the frames' states use) | standardised (the state standardised feature by
    # feature with running training statistics, through a head of its own whose output moves every frame's query:
    # frame 0's from q_init; vlm/running_norm.py says why)
    question_query: str = "shared"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model.mode", self.mode, MODES)
        _choice("model.question_query", self.question_query, ("shared", "standardised"))
        if self.question_query != "shared" and self.frames_at != "after_question":
            raise ConfigError(
                f"'model.question_query' is {self.question_query!r}, but model.frames_at is {self.frames_at!r}: "
                "only frames_at after_question writes a query from the question"
            )
        _choice("model.fine_start", self.fine_start, ("random", "coarse"))
        _choice("model.query_start", self.query_start, ("random", "cls"))
        if self.glimpses < 1:
            raise ConfigError(f"'model.glimpses' must be >= 1, got {self.glimpses}")
        if self.fine_passes < 1:
            raise ConfigError(f"'model.fine_passes' must be >= 1, got {self.fine_passes}")
        if self.coarse_weight < 0:
            raise ConfigError(f"'model.coarse_weight' must be >= 0, got {self.coarse_weight}")


@dataclass
class TowerModelConfig(ChatModelConfig):
    """A vision tower (DINOv2, CLIP, SigLIP or ViT) and a connector from its patches or pooled token to the LLM."""

    tower: str = DINO_HUB_ID  # hub id, local dir, or "packaged" (DINOv2-small)
    image_prep: str = "resize"  # resize: squash to the frame size | letterbox: longest side to it on black

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model.image_prep", self.image_prep, ("resize", "letterbox"))


@dataclass
class PixelShuffleConfig(TowerModelConfig):
    """Space-to-depth by `scale` on the patch grid, then one linear map (Idefics3 / SmolVLM)."""

    kind: str = "pixel_shuffle"
    scale: int = 4  # r: r x r patches become one token (SmolVLM-256M: 4; 3 gives 9x fewer tokens)


@dataclass
class MlpConfig(TowerModelConfig):
    """Linear -> GELU -> Linear over every patch token (LLaVA-1.5)."""

    kind: str = "mlp"


@dataclass
class ClsGateConfig(TowerModelConfig):
    """The CLS (pooled) embedding -> Linear -> Linear: one token per frame."""

    kind: str = "cls_gate"
    hidden: int = 512


@dataclass
class QFormerOptions:
    """TokenLearner + LLaMA-style Q-Former sizes (defaults fit SmolLM2-135M's block shape)."""

    num_queries: int = 64  # S tokens per frame (inside SmolVLM: the processor's image_seq_len)
    num_tokens: int = 256  # T TokenLearner tokens the Q-Former reads; 0: it reads the patches directly
    version: str = "1.1"  # TokenLearner 1.1 (MLP + softmax) | 1 (convs + sigmoid)
    bottleneck: int = 64
    hidden_size: int = 576
    num_layers: int = 2
    num_heads: int = 9
    num_kv_heads: int = 3
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _choice("version", self.version, ("1", "1.1"))
        for key in ("num_queries", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")


@dataclass
class TokenLearnerQFormerConfig(TowerModelConfig, QFormerOptions):
    """TokenLearner pools the patches, a LLaMA-style Q-Former's learned queries read them."""

    kind: str = "tokenlearner_qformer"

    def __post_init__(self) -> None:
        TowerModelConfig.__post_init__(self)
        QFormerOptions.__post_init__(self)


@dataclass
class SmolVLMConfig(ModelConfig):
    """SmolVLM (Idefics3) with its own image-token prompt layout; its connector optionally swapped for a
    TokenLearner-QFormer."""

    kind: str = "smolvlm"
    hub: str = "HuggingFaceTB/SmolVLM-256M-Instruct"  # hub id or local dir of an Idefics3 model + processor
    connector: str = "tokenlearner_qformer"  # tokenlearner_qformer (a new one) | idefics3 (the pretrained one)
    qformer: QFormerOptions = field(default_factory=QFormerOptions)
    image_splitting: bool | None = None  # cut large images into tiles besides one global view; None: as the hub's

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model.connector", self.connector, ("tokenlearner_qformer", "idefics3"))


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """One data source; `weight` is its share of a mix (the first source of a list sets the epoch)."""

    kinds: ClassVar[dict[str, type[SourceConfig]]] = {}
    kind: str = "shards"
    weight: float = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SourceConfig.kinds[cls.__dict__["kind"]] = cls

    def __post_init__(self) -> None:
        if self.kind != type(self).__dict__.get("kind"):
            raise ConfigError(f"source kind {self.kind!r} given to a {type(self).__dict__.get('kind')!r} source")
        if not self.weight > 0:
            raise ConfigError(f"a source's 'weight' must be > 0, got {self.weight}")


@dataclass
class ShardSource(SourceConfig):
    """WebDataset shards in the project's format: globs or brace lists ("a-{000..099}.tar")."""

    kind: str = "shards"
    path: str | list[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError("a shards source needs 'path' (a glob, brace list or list of them)")


@dataclass
class TextVQASource(SourceConfig):
    """TextVQA in its published layout (TextVQA_0.5.1_{train,val}.json + train_images/)."""

    kind: str = "textvqa"
    root: str = ""
    split: str = "train"
    subset: int = 0  # train on this many questions (a seeded choice, the same every epoch); 0 = all

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("split", self.split, ("train", "val"))
        if not self.root or self.subset < 0:
            raise ConfigError("a textvqa source needs 'root' (and 'subset' >= 0)")


@dataclass
class CaptionSource(SourceConfig):
    """Captions in the Karpathy-split JSON (dataset_flickr30k.json / dataset_coco.json) or COCO 2017's
    annotations/captions_{train,val}2017.json (a directory `root`)."""

    kind: str = "captions"
    file: str = ""  # a Karpathy JSON, or a COCO root directory
    images: str = ""  # the images root (default: beside the JSON)
    split: str = "train"
    per: str = "caption"  # caption: one sample per caption | image: one per image, a caption drawn per epoch

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("per", self.per, ("caption", "image"))
        if not self.file:
            raise ConfigError("a captions source needs 'file'")


@dataclass
class DataConfig:
    """Sources → batches (data.py): every kind of model reads the same sources; its processor makes the batch."""

    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
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
    # how data.train's sources are mixed: "sample" (each batch mixes them by weight) or "batch" (each batch is
    # drawn whole from one source, the sources' shares of batches by weight): batches of one source pad to
    # their own lengths, not to the longest source's
    mix: str = "sample"
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("data.stage", self.stage, (1, 2, 3))
        _choice("data.mix", self.mix, ("sample", "batch"))
        if self.frame_budget is not None and self.frame_budget < self.max_frames:
            raise ConfigError(f"'data.frame_budget' ({self.frame_budget}) is below 'data.max_frames'")
        for key in ("batch_size", "max_frames", "frame_size", "replicate_image_frames", "max_text_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'data.{key}' must be >= 1, got {getattr(self, key)}")


# ---- optimisation and the loop -------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW with one learning rate per parameter group (connector, vision, llm); 0 freezes the group."""

    lr_connector: float = 1e-3
    lr_vision: float = 1e-5  # the vision tower: DINOv2, CLIP, SigLIP, ViT
    lr_llm: float = 1e-5  # the LLM, or only its LoRA adapters when model.lora is set
    # the foveated model's queries (static, first, and the LLM-to-query head) in a group of their own; unset,
    # they are connector parameters (published). Slower than the readout, they keep the look they start with
    # while the readout learns what it carries, rather than wandering off before any answer depends on it
    lr_query: float | None = None
    schedule: str = "converging"  # constant | linear | cosine | converging (see schedule.py)
    warmup: float = 0.03  # fraction of max_steps spent warming up linearly
    target_lr: float = 3e-5  # converging: the rate every group ends at
    min_lr_ratio: float = 0.0  # linear, cosine: the end rate as a fraction of each group's peak
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    # adamw (torch's; fused on CUDA) | adamw8bit (bitsandbytes' AdamW8bit: 8-bit moments, CUDA only)
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _choice("optim.optimizer", self.optimizer, ("adamw", "adamw8bit"))
        if min(self.lr_connector, self.lr_vision, self.lr_llm, self.lr_query or 0.0) < 0:
            raise ConfigError("'optim.lr_*' must be >= 0 (0 freezes the group)")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"'optim.warmup' is a fraction of max_steps in [0, 1), got {self.warmup}")


@dataclass
class TrainConfig:
    """The training loop, its validation, checkpoints and logs."""

    init_from: str = ""  # a saved model dir (e.g. stage 1's final/); empty = a new model from `model`'s backbones
    max_steps: int = 1000  # optimizer steps; the data is read in as many epochs as that takes
    epochs: int = 0  # > 0: instead of max_steps, this many passes over data of known size (not shards)
    accumulate: int = 1  # micro-batches per optimizer step (per process)
    bf16: bool | str = "auto"  # bf16 autocast (weights and optimizer stay fp32); auto: where the hardware does bf16
    # fp16 autocast with a gradient scaler, for a GPU without bf16 (a T4, a V100): what bf16 auto takes there
    fp16: bool = False
    compile: bool = False  # torch.compile the model
    # how several processes hold the model: ddp (a whole copy each, gradients all-reduced) | fsdp (FSDP2: each
    # process keeps a 1/N shard of the weights, gradients and AdamW moments, gathering a layer only to run it);
    # one process runs unwrapped either way
    parallel: str = "ddp"
    gradient_checkpointing: bool = False
    dpo_beta: float = 0.1  # stage 3
    max_nonfinite: int = 5  # steps in a row whose loss or gradient is NaN/inf (each skipped) before the run stops
    ddp_timeout: float = 600  # seconds a process waits for the others in a collective before it gives up
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
        _choice("train.best_metric", self.best_metric, ("val_loss", "loss"))
        _choice("train.wandb", self.wandb, ("disabled", "offline", "online"))
        _choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        if isinstance(self.bf16, str):
            _choice("train.bf16", self.bf16, ("auto",))
        if self.fp16 and self.bf16 is True:
            raise ConfigError("'train.fp16' and 'train.bf16' are both true: autocast takes one of them")
        if self.fp16 and self.parallel == "fsdp":
            raise ConfigError("'train.fp16' with 'train.parallel' fsdp is not supported: its gradient scaler would "
                              "see only each process's shards; use ddp, or bf16 where the GPU has it")  # fmt: skip
        for key in ("max_steps", "accumulate", "save_every", "keep_last", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'train.{key}' must be >= 1, got {getattr(self, key)}")
        if self.epochs < 0:
            raise ConfigError(f"'train.epochs' must be >= 0, got {self.epochs}")
        if self.ddp_timeout <= 0:
            raise ConfigError(f"'train.ddp_timeout' must be > 0 seconds, got {self.ddp_timeout}")
        validated = self.val_every and self.save_every % self.val_every == 0
        if self.keep_best and self.best_metric == "val_loss" and not validated:
            raise ConfigError("'train.keep_best' by val_loss needs 'train.save_every' a multiple of 'train.val_every'")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: FoveatedConfig())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        """The checks that span sections."""
        d, t = self.data, self.train
        if t.val_every and not d.val:
            raise ConfigError("'train.val_every' > 0 needs 'data.val' sources")
        if isinstance(self.model, SmolVLMConfig) and d.stage == 3:
            raise ConfigError("model.kind smolvlm trains stages 1 and 2 (DPO needs a frames-first kind)")
        if self.optim.lr_query is not None and not isinstance(self.model, FoveatedConfig):
            raise ConfigError(f"'optim.lr_query' is for the foveated model's queries; model.kind {self.model.kind}"
                              " has none: remove the key")  # fmt: skip
        if t.epochs and any(isinstance(s, ShardSource) for s in d.train):
            raise ConfigError("shards have no known size: set 'train.max_steps', not 'train.epochs'")


# ---- YAML to dataclasses -------------------------------------------------------------------------


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _tagged(base: type, value: Any, where: str) -> type:
    """The subclass of `base` (ModelConfig, SourceConfig) that `value`'s `kind` names."""
    kinds = base.kinds
    kind = value.get("kind", base.kind) if isinstance(value, dict) else None
    if kind not in kinds:
        raise ConfigError(f"'{where}.kind' must be one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind]


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is SourceConfig and isinstance(value, str):  # a bare string is a shards source
        value = {"kind": "shards", "path": value}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        if hint in (ModelConfig, SourceConfig):
            hint = _tagged(hint, value, where)
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
            if typing.get_args(hint) == (SourceConfig,):  # one source need not be a list
                value = [value]
            else:
                raise ConfigError(f"'{where}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # fixed-length, e.g. (r, g, b)
        items = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ConfigError(f"'{where}' must be a list of {len(items)}, got {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True)))
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
            kind = f" (model.kind {data.get('kind', cls.kind)})" if issubclass(cls, ModelConfig) else ""
            raise ConfigError(f"unknown config key '{where}{key}'{kind}{_suggest(key, names)}")
    try:
        obj = cls(**{k: _coerce(v, hints[k], where + k) for k, v in data.items()})
    except ConfigError as e:
        if where and not str(e).startswith("'"):
            raise ConfigError(f"{where.rstrip('.')}: {e}") from None
        raise
    object.__setattr__(obj, "given", frozenset(data))  # the keys the YAML set (not a field: never saved)
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> list[str]:
    """Apply one `a.b=c` override in place; the value is parsed as YAML (so 1e-5, true, [1,2] work). Returns the
    key's parts. Errors name the override as given (`--set ...`): the command line, not the YAML, holds it."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: must look like key.sub=value, e.g. train.max_steps=10")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"--set {assignment}: the key must be names joined by dots, e.g. train.max_steps=10")
    *parents, leaf = parts
    node = data
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment}: '{'.'.join(parents[: i + 1])}' is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({e})") from None
    return parts


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (itself, or the one of an Optional); None for a leaf."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _override_problem(parts: list[str], data: dict) -> str | None:
    """What is wrong with the key an override sets, or with its value taken alone; None where nothing is.

    The key is walked down the config's dataclasses (the model section as the kind `data` names); a key below a
    list of sources is left to the whole config's check, which names it too.
    """
    cls: Any = Config
    node: Any = data
    for i, part in enumerate(parts):
        note = ""
        if cls is ModelConfig:
            kind = node.get("kind", ModelConfig.kind) if isinstance(node, dict) else ModelConfig.kind
            if kind not in ModelConfig.kinds:
                return None  # the whole config's check names the kind
            cls, note = ModelConfig.kinds[kind], f" (model.kind {kind})"
        names = [f.name for f in dataclasses.fields(cls)]
        where = ".".join(parts[: i + 1])
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            section = ".".join(parts[:i] + [""])
            hint = f"did you mean '{section}{close[0]}'?" if close else f"valid keys: {', '.join(sorted(names))}"
            return f"unknown config key '{where}'{note} ({hint})"
        field_hint = typing.get_type_hints(cls)[part]
        node = node.get(part) if isinstance(node, dict) else None
        if i == len(parts) - 1:
            try:
                _coerce(node, field_hint, where)
            except ConfigError as e:
                return str(e)
            return None
        inner = _dataclass_in(field_hint)
        if inner is None or inner is SourceConfig:
            return None  # below a leaf or a list of sources: the whole config's check decides
        cls = inner
    return None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config of YAML file `path` (None: the defaults) with `overrides` (`--set a.b=c`) applied.

    An error is blamed where the mistake is: on the `--set` override that set the key it names, else on the YAML
    file, so that a typo on the command line is not looked for in a file that does not hold it.
    """
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a mapping at the top level")
    applied = [(o, apply_override(data, o)) for o in overrides]
    # checked once all are applied (a later one may set the model.kind an earlier one's key needs), deeper keys
    # first: `model.lora.x=1` is the culprit, not an earlier `model.lora={r: 4}` whose section it put x in
    for o, parts in sorted(applied, key=lambda applied: -len(applied[1])):
        problem = _override_problem(parts, data)
        if problem:
            raise ConfigError(f"--set {o}: {problem}")
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        message = str(e)
    keys = [(o, re.compile(rf"'{re.escape('.'.join(parts))}[.']")) for o, parts in reversed(applied)]
    blamed = next((o for o, key in keys if key.search(message)), None)  # the key it names, or one below it
    raise ConfigError(f"--set {blamed}: {message}" if blamed else f"{path or 'config'}: {message}")


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def model_config(data: dict, where: str = "model") -> ModelConfig:
    """A saved model's options (checkpoint JSON) as the dataclass of its kind."""
    return _coerce(data, ModelConfig, where)
