"""Two-layer MLP projector (LLaVA-1.5): every patch becomes one LLM token.

No compression: the cost is P tokens per frame, which suits single images more than long videos. Submodule
names follow transformers' LLaVA projector (linear_1, act, linear_2).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class MLPProjector(nn.Module):
    """patches (N, P, Dv) → Linear(Dv→D) → GELU → Linear(D→D) → (N, P, D)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    @classmethod
    def from_options(cls, options: Any, vision_dim: int, llm_dim: int) -> MLPProjector:
        """From the model kind's options (config.MlpConfig: nothing to choose)."""
        return cls(vision_dim, llm_dim)

    def forward(self, patches: Tensor, pooled: Tensor | None = None) -> Tensor:
        """patches (N, P, Dv); pooled unused → (N, P, llm_dim) in the patches' dtype."""
        x = patches.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(x))).to(patches.dtype)

    def tokens_per_frame(self, grid: int) -> int:
        return grid * grid
