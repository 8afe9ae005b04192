"""TokenLearner + LLaMA-style Q-Former connector (inside SmolVLM): S learned queries read TokenLearner tokens.

Shapes: N images, P patch positions, T TokenLearner tokens, S output tokens (= queries). With `num_tokens` 0
there is no TokenLearner and the queries read the P patches directly; with one layer that is the plain
attention-pooling connector (learned queries, one cross-attention), a one-layer member of the same family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config import QFormerOptions


class TokenLearner(nn.Module):
    """Pools P patch features into `num_tokens` tokens through learned spatial maps (Ryoo et al. 2021).

    v1.1 scores every position with a LayerNorm + bottleneck MLP and softmaxes over positions, so each
    token is a convex combination of the inputs. v1 scores with a conv stack over the patch grid and
    sigmoid gates, then mean-pools; it needs a square grid.
    """

    def __init__(self, dim: int, num_tokens: int, bottleneck: int = 64, version: str = "1.1") -> None:
        super().__init__()
        if version not in ("1", "1.1"):
            raise ValueError(f"TokenLearner version must be '1' or '1.1', got {version!r}")
        self.version = version
        self.norm = nn.LayerNorm(dim)
        if version == "1.1":
            self.score = nn.Sequential(nn.Linear(dim, bottleneck), nn.GELU(), nn.Linear(bottleneck, num_tokens))
        else:
            convs = [nn.Conv2d(dim if i == 0 else num_tokens, num_tokens, 3, padding=1, bias=False) for i in range(4)]
            self.score = nn.Sequential(convs[0], nn.GELU(), convs[1], nn.GELU(), convs[2], nn.GELU(), convs[3])

    def forward(self, x: torch.Tensor, return_maps: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (N, P, dim) → tokens (N, T, dim) [, maps (N, T, P)]."""
        n, p, d = x.shape
        h = self.norm(x)  # (N, P, dim)
        if self.version == "1.1":
            logits = self.score(h).transpose(1, 2)  # (N, T, P)
            # softmax in fp32: with P ≈ 1000 positions bf16 rounding visibly skews the weights
            maps = logits.float().softmax(dim=-1).to(x.dtype)  # (N, T, P), rows sum to 1
            tokens = maps @ x  # (N, T, dim): weighted sums of the un-normalised inputs
        else:
            side = math.isqrt(p)
            if side * side != p:
                raise ValueError(f"TokenLearner v1 needs a square patch grid, got {p} positions")
            grid = h.transpose(1, 2).reshape(n, d, side, side)  # (N, dim, side, side)
            maps = torch.sigmoid(self.score(grid).flatten(2))  # (N, T, P)
            tokens = maps @ x / p  # (N, T, dim): spatial mean of the gated inputs
        return (tokens, maps) if return_maps else tokens


class Attention(nn.Module):
    """Bias-free multi-head attention from queries to a context; fewer KV heads than query heads is GQA."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError("need dim % num_heads == 0 and num_heads % num_kv_heads == 0")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(context_dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(context_dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (N, S, dim), context (N, T, context_dim) → (N, S, dim)."""
        n, s, _ = x.shape
        q = self.q_proj(x).view(n, s, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, S, hd)
        k = self.k_proj(context).view(n, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (N, Hkv, T, hd)
        v = self.v_proj(context).view(n, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (N, Hkv, T, hd)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(n, s, -1))  # (N, S, dim)


class SwiGLU(nn.Module):
    """LLaMA's gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QFormerBlock(nn.Module):
    """Pre-RMSNorm block: queries attend to each other, then read the context, then a SwiGLU MLP."""

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, num_kv_heads: int, intermediate_size: int, eps: float
    ) -> None:
        super().__init__()
        self.self_norm = nn.RMSNorm(dim, eps=eps)
        self.self_attn = Attention(dim, dim, num_heads, num_kv_heads)
        self.cross_norm = nn.RMSNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, context_dim, num_heads, num_kv_heads)
        self.mlp_norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, intermediate_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (N, S, dim), context (N, T, context_dim), already normalised → (N, S, dim)."""
        h = self.self_norm(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.cross_norm(x), context)
        return x + self.mlp(self.mlp_norm(x))


class LlamaQFormer(nn.Module):
    """Learned queries that read a token set through LLaMA-style blocks and come out at `out_dim` width.

    No positional encoding: each query is its own learned vector and each TokenLearner token comes from
    a fixed map index, so identity already tells them apart.
    """

    def __init__(
        self,
        num_queries: int,
        dim: int,
        context_dim: int,
        out_dim: int,
        num_layers: int = 2,
        num_heads: int = 9,
        num_kv_heads: int = 3,
        intermediate_size: int = 1536,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)  # (S, dim)
        self.context_norm = nn.RMSNorm(context_dim, eps=eps)
        self.layers = nn.ModuleList(
            QFormerBlock(dim, context_dim, num_heads, num_kv_heads, intermediate_size, eps) for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, out_dim, bias=False)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context (N, T, context_dim) → (N, S, out_dim)."""
        context = self.context_norm(context)
        x = self.queries.expand(context.shape[0], -1, -1)  # (N, S, dim)
        for layer in self.layers:
            x = layer(x, context)
        return self.proj(self.norm(x))


class TokenLearnerQFormer(nn.Module):
    """Image connector: patch features (N, P, vision_hidden) → (N, S, text_hidden).

    Serves both hosts with one forward: Idefics3 calls `connector(image_hidden_states)` with one tensor, the
    tower models call `connector(patches, pooled)`; the pooled vector is not read (the queries see every patch
    or TokenLearner token), so it is optional rather than wrapped in an adapter.
    Computes in its own parameter dtype and returns the input's dtype, so the host model sees the dtype it
    passed in even when the connector is kept in higher precision.
    """

    def __init__(self, config: QFormerOptions, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        if config.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0 (0: no TokenLearner), got {config.num_tokens}")
        self.config = config
        self.token_learner = (
            TokenLearner(vision_hidden, config.num_tokens, config.bottleneck, config.version)
            if config.num_tokens
            else None
        )
        self.qformer = LlamaQFormer(
            config.num_queries,
            config.hidden_size,
            vision_hidden,
            text_hidden,
            config.num_layers,
            config.num_heads,
            config.num_kv_heads,
            config.intermediate_size,
            config.rms_norm_eps,
        )

    @classmethod
    def from_options(cls, options: QFormerOptions, vision_dim: int, llm_dim: int) -> TokenLearnerQFormer:
        """From the run's options (config.QFormerOptions, or a kind's config that holds them) and the widths."""
        return cls(options, vision_dim, llm_dim)

    def forward(
        self, image_hidden_states: torch.Tensor, pooled: torch.Tensor | None = None, *, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """image_hidden_states (N, P, vision_hidden); pooled unused → (N, S, text_hidden)
        [, TokenLearner maps (N, T, P), None without a TokenLearner]."""
        x = image_hidden_states.to(self.qformer.queries.dtype)
        maps = None
        if self.token_learner is not None:
            x, maps = self.token_learner(x, return_maps=True)  # (N, T, vision_hidden), (N, T, P)
        out = self.qformer(x).to(image_hidden_states.dtype)  # (N, S, text_hidden)
        return (out, maps) if return_maps else out

    def tokens_per_frame(self, grid: int) -> int:
        return self.config.num_queries
