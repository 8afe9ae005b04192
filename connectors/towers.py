"""Vision towers in one form: any of four transformers vision models → patch features and one pooled vector.

Connectors must not care which backbone they read, so every family answers the same question the same way:
`patches` are the final hidden states of the patch positions after the model's last norm over the sequence,
`pooled` is the one vector per image the family was trained to summarise with.

- dinov2: patches `last_hidden_state[:, 1:]` (already layer-normed); pooled its CLS (= `pooler_output`).
- clip: patches `post_layernorm(last_hidden_state)[:, 1:]`; pooled `pooler_output` (the post-layernormed CLS).
- siglip: patches `last_hidden_state` (post-layernormed, no CLS); pooled the attention-pooling head's
  `pooler_output`, or the mean of the patches when the model has no head (`vision_use_head: false`).
- vit: patches `last_hidden_state[:, 1:]` (layer-normed); pooled `pooler_output` (dense + tanh on the CLS) when
  the model has a pooler, else the CLS.

CLIP's `last_hidden_state` is the raw residual stream (its `post_layernorm` is only applied to the CLS), so the
tower applies `post_layernorm` to every token: patches then come out normalised as for the other three
families (Idefics3 feeds SigLIP's post-layernormed states the same way), and the CLS row of the normed
sequence is exactly `pooler_output`. LLaVA reads CLIP's penultimate layer without the norm instead; a
connector trained from scratch does not need that choice, and one rule for every family keeps them comparable.

Pixels come in normalised with the tower's own `mean`/`std` (what the family's transformers image processor
uses: CLIP's OpenAI statistics, 0.5/0.5 for SigLIP and google ViT, ImageNet's for DINOv2 — whose hub
preprocessor configs set them over BitImageProcessor's CLIP defaults). At a size other than `image_size` the
position embeddings are interpolated (DINOv2 always does so by itself).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

# family: (model class, config class, mean, std, has a CLS token)
FAMILIES: dict[str, tuple[type[PreTrainedModel], type[PreTrainedConfig], tuple, tuple, bool]] = {
    "dinov2": (Dinov2Model, Dinov2Config, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, True),
    "clip": (CLIPVisionModel, CLIPVisionConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, True),
    "siglip": (SiglipVisionModel, SiglipVisionConfig, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, False),
    "vit": (ViTModel, ViTConfig, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, True),
}


def family_of(model: PreTrainedModel) -> str:
    """The family name of a supported transformers vision model; TypeError for anything else."""
    for family, (cls, *_) in FAMILIES.items():
        if isinstance(model, cls):
            return family
    supported = ", ".join(cls.__name__ for cls, *_ in FAMILIES.values())
    raise TypeError(f"unsupported vision tower {type(model).__name__}; expected one of {supported}")


class VisionTower(nn.Module):
    """One interface over Dinov2Model, CLIPVisionModel, SiglipVisionModel and ViTModel (see the module doc)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.family = family_of(model)
        self.model = model  # parameter names: model.<transformers names>
        _, _, mean, std, self.has_cls = FAMILIES[self.family]
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        config = model.config
        self.dim: int = config.hidden_size
        self.patch_size: int = config.patch_size
        self.image_size: int = config.image_size
        pooler = getattr(model, "pooler", None)
        if self.family == "vit" and pooler is not None and pooler.dense.out_features != self.dim:
            raise ValueError(f"ViT pooler outputs {pooler.dense.out_features} features, the tower promises {self.dim}")

    def grid(self, size: int) -> int:
        """Patch-grid side at input size `size`."""
        return size // self.patch_size

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels (N, 3, H, W), normalised with mean/std → patches (N, P, D), pooled (N, D)."""
        kwargs: dict[str, Any] = {}
        if self.family != "dinov2":  # DINOv2 interpolates by itself whenever the grid differs
            kwargs["interpolate_pos_encoding"] = tuple(pixels.shape[-2:]) != (self.image_size, self.image_size)
        out = self.model(pixel_values=pixels, **kwargs)
        seq = out.last_hidden_state  # (N, 1+P, D); SigLIP (N, P, D)
        if self.family == "clip":
            seq = self.model.post_layernorm(seq)
        patches = seq[:, 1:] if self.has_cls else seq  # (N, P, D)
        if self.family == "siglip":
            pooled = out.pooler_output if out.pooler_output is not None else patches.mean(1)
        elif self.family in ("clip", "vit") and out.pooler_output is not None:
            pooled = out.pooler_output
        else:  # DINOv2, ViT without a pooler: the CLS of the normed sequence
            pooled = seq[:, 0]
        return patches, pooled

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the tower's layers in backward (non-reentrant, so frozen inputs still pass gradients)."""
        self.model.activation_checkpointing_enable({"use_reentrant": False})


def tower_config(model: PreTrainedModel | VisionTower) -> dict[str, Any]:
    """What `tower_from_config` needs to rebuild the tower's architecture: JSON-serialisable, no weights."""
    model = model.model if isinstance(model, VisionTower) else model
    family = family_of(model)
    d: dict[str, Any] = {"family": family, "config": model.config.to_dict()}
    if family == "vit":  # a ViTModel loaded from a classifier checkpoint has no (trained) pooler
        d["pooler"] = model.pooler is not None
    return d


def tower_from_config(d: dict[str, Any]) -> VisionTower:
    """A randomly initialised tower of the saved family and shape; load the saved state dict into it."""
    if d.get("family") not in FAMILIES:
        raise ValueError(f"unknown tower family {d.get('family')!r}; expected one of {sorted(FAMILIES)}")
    model_cls, config_cls, *_ = FAMILIES[d["family"]]
    config = config_cls.from_dict(d["config"])
    model = ViTModel(config, add_pooling_layer=d.get("pooler", True)) if d["family"] == "vit" else model_cls(config)
    return VisionTower(model)
