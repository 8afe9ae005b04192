"""Tiny random vision towers of each family: 16 px, patch 4 (a 4×4 grid), width 32, two layers.

Every weight, bias and norm is randomised so no family's outputs hide behind an identity init.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from connectors.towers import VisionTower

FAMILIES = ("dinov2", "clip", "siglip", "vit")
IMAGE, PATCH, DIM = 16, 4, 32
_SHAPE = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH, image_size=IMAGE)


def tiny_vision_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """The transformers model of `family`; `overrides` go to its config (e.g. vision_use_head=False)."""
    if family == "dinov2":
        model = Dinov2Model(Dinov2Config(**_SHAPE, mlp_ratio=2, layerscale_value=0.5, **overrides))
    elif family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**_SHAPE, intermediate_size=64, **overrides))
    elif family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**_SHAPE, intermediate_size=64, **overrides))
    elif family == "vit":
        pooler = overrides.pop("pooler", True)
        model = ViTModel(ViTConfig(**_SHAPE, intermediate_size=64, **overrides), add_pooling_layer=pooler)
    else:
        raise ValueError(family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return model.eval()


def tiny_tower(family: str, seed: int = 0, **overrides) -> VisionTower:
    return VisionTower(tiny_vision_model(family, seed, **overrides)).eval()


def pixels(n: int, size: int | tuple[int, int] = IMAGE, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
