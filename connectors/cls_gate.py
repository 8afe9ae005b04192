"""CLS "gate" connector (the single-token captioner design): the pooled embedding becomes one LLM token a frame.

As in that design, a projector Linear(Dv→hidden) and a gate Linear(hidden→D), with nothing between them: the
pair is a low-rank linear map, kept as two layers so that design's `proj_final.pt` / `gate_final.pt` state dicts
load into `projector` / `gate` unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class ClsGate(nn.Module):
    """pooled (N, Dv) → Linear(Dv→hidden) → Linear(hidden→D) → (N, 1, D)."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.projector = nn.Linear(vision_dim, hidden)
        self.gate = nn.Linear(hidden, llm_dim)

    @classmethod
    def from_options(cls, options: Any, vision_dim: int, llm_dim: int) -> ClsGate:
        """From the model kind's options (config.ClsGateConfig)."""
        return cls(vision_dim, llm_dim, options.hidden)

    def forward(self, patches: Tensor, pooled: Tensor) -> Tensor:
        """patches (N, P, Dv) unused but for their dtype; pooled (N, Dv) → (N, 1, llm_dim)."""
        x = pooled.to(self.projector.weight.dtype)
        return self.gate(self.projector(x))[:, None].to(patches.dtype)

    def tokens_per_frame(self, grid: int) -> int:
        return 1
