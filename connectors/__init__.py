"""Connectors: a vision tower's output for N frames → (N, S, D_llm) tokens, one module per design.

Every connector is built from plain sizes (the TokenLearner-QFormer from its config dataclass), is called as
`connector(patches (N, P, Dv), pooled (N, Dv))` and returns (N, S, D_llm) in the patches' dtype, with
S = `connector.tokens_per_frame(grid)` on a grid×grid patch grid. Adding one = a module here, its config
dataclass, one line in CONNECTORS.
"""

from connectors.cls_gate import ClsGate
from connectors.mlp import MLPProjector
from connectors.pixel_shuffle import PixelShuffle, pixel_shuffle
from connectors.tokenlearner_qformer import (
    Attention,
    LlamaQFormer,
    QFormerBlock,
    SwiGLU,
    TokenLearner,
    TokenLearnerQFormer,
)

CONNECTORS = {
    "pixel_shuffle": PixelShuffle,
    "mlp": MLPProjector,
    "cls_gate": ClsGate,
    "tokenlearner_qformer": TokenLearnerQFormer,
}

__all__ = [
    "CONNECTORS",
    "Attention",
    "ClsGate",
    "LlamaQFormer",
    "MLPProjector",
    "PixelShuffle",
    "QFormerBlock",
    "SwiGLU",
    "TokenLearner",
    "TokenLearnerQFormer",
    "pixel_shuffle",
]
