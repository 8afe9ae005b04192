"""Pixel-shuffle connector (Idefics3 / SmolVLM): r×r neighbouring patches become one token.

Space-to-depth keeps every feature of every patch (nothing is pooled away) while dividing the token count by
r², and the single linear map then learns how to mix the r² patches it sees. Token order and feature layout are
Idefics3's, so its pretrained `modality_projection.proj.weight` can be loaded into `proj.weight` as it is.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn


def pixel_shuffle(x: Tensor, scale: int) -> Tensor:
    """x (N, P, D) on a square √P×√P grid → (N, P/scale², D·scale²).

    Output tokens run row-major over the (√P/scale)² blocks; a token's features are its block's patches in
    row-major order, each patch's D features contiguous.
    """
    n, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"pixel shuffle needs a square patch grid, got {p} patches")
    if side % scale:
        raise ValueError(f"pixel shuffle by {scale} needs a grid side divisible by it, got {side}x{side}")
    g = side // scale
    x = x.reshape(n, g, scale, g, scale, d)  # (N, block row, row in block, block col, col in block, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, g * g, scale * scale * d)


class PixelShuffle(nn.Module):
    """patches (N, P, Dv) → space-to-depth by `scale` → (N, P/scale², Dv·scale²) → Linear → (N, P/scale², llm_dim)."""

    def __init__(self, vision_dim: int, llm_dim: int, scale: int) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"pixel shuffle scale must be >= 1, got {scale}")
        self.scale = scale
        self.proj = nn.Linear(vision_dim * scale * scale, llm_dim, bias=False)

    @classmethod
    def from_options(cls, options: Any, vision_dim: int, llm_dim: int) -> PixelShuffle:
        """From the model kind's options (config.PixelShuffleConfig)."""
        return cls(vision_dim, llm_dim, options.scale)

    def forward(self, patches: Tensor, pooled: Tensor | None = None) -> Tensor:
        """patches (N, P, Dv); pooled unused → (N, P/scale², llm_dim) in the patches' dtype."""
        x = pixel_shuffle(patches.to(self.proj.weight.dtype), self.scale)  # (N, P/r², Dv·r²)
        return self.proj(x).to(patches.dtype)

    def tokens_per_frame(self, grid: int) -> int:
        if grid % self.scale:
            raise ValueError(f"pixel shuffle by {self.scale} needs a grid side divisible by it, got {grid}")
        return (grid // self.scale) ** 2
