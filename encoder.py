"""FoveatedEncoder: DINOv2 patches encoded once, then read by queries at one token per query.

The patch side never attends to a query, so each layer's keys and values of the patch tokens do
not depend on the query. `encode_patches` runs the backbone once per frame and keeps them;
`query_attend` then sends any number of queries through the same layers, with the same weights,
at the cost of a handful of extra tokens instead of a second backbone pass.

Two models that read the same batches through the same frozen backbone (a run and its glance, trained side by
side: train.train_together) can share one `PatchMemo`: the second model's patch pass of a batch is the first's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import Dinov2Model

from vlm.casts import stamp


@dataclass
class PatchCache:
    """What queries need from a batch of N frames; independent of the queries."""

    keys: list[Tensor]  # per layer (N, heads, 1+P, head_dim)
    values: list[Tensor]  # per layer (N, heads, 1+P, head_dim)
    features: Tensor | None  # (N, 1+P, D) final layer-normed hidden states (the shallow read's; None for the deep)

    def select(self, index: Tensor) -> PatchCache:
        """Frames `index` (N',), copied."""
        return PatchCache(
            [k[index] for k in self.keys],
            [v[index] for v in self.values],
            None if self.features is None else self.features[index],
        )

    def narrow(self, start: int, length: int) -> PatchCache:
        """Frames start..start+length as views (no copy)."""
        return PatchCache(
            [k.narrow(0, start, length) for k in self.keys],
            [v.narrow(0, start, length) for v in self.values],
            None if self.features is None else self.features.narrow(0, start, length),
        )


@dataclass
class _Pass:
    key: tuple
    weights: list[tuple[Tensor, tuple[int, int]]]  # the backbone's weights and their stamps, held
    frames: Tensor
    cache: PatchCache


class PatchMemo:
    """The last `size` patch passes, kept for a second encoder that reads the same frames through the same frozen
    weights (a run and its glance taking steps in turn: `size` is the micro-batches of a step).

    A pass is reused only when nothing could make it differ: the frames are equal (compared whole), the weights in
    the backbone's slots are the same tensors unchanged since (identity and version; they are held here, so an
    address cannot be reused by another tensor), and the deep/shallow read, train/eval mode, inference mode and
    autocast are the same; and only while no gradient can reach the backbone (its weights frozen), so the kept
    tensors carry no graph."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.passes: list[_Pass] = []  # oldest first

    @staticmethod
    def _key(encoder: FoveatedEncoder, frames: Tensor) -> tuple:
        device = frames.device.type
        cast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        inference = torch.is_inference_mode_enabled()  # inference tensors cannot serve a training step
        return encoder.deep, encoder.training, cast, inference, tuple(frames.shape), frames.dtype, frames.device

    def get(self, encoder: FoveatedEncoder, frames: Tensor) -> PatchCache | None:
        key, weights = self._key(encoder, frames), list(encoder.dino.parameters())
        for done in self.passes:
            if (
                done.key == key
                and len(weights) == len(done.weights)
                and all(w is h and stamp(w) == s for w, (h, s) in zip(weights, done.weights, strict=True))
                and torch.equal(frames, done.frames)
            ):
                return done.cache
        return None

    def put(self, encoder: FoveatedEncoder, frames: Tensor, cache: PatchCache) -> None:
        weights = [(w, stamp(w)) for w in encoder.dino.parameters()]
        self.passes = [*self.passes, _Pass(self._key(encoder, frames), weights, frames.detach().clone(), cache)]
        self.passes = self.passes[-self.size :]


class FoveatedEncoder(nn.Module):
    def __init__(self, dino: Dinov2Model, query_dim: int = 384, deep: bool = True):
        super().__init__()
        self.dino = dino
        self.deep = deep
        dim = dino.config.hidden_size
        self.query_in = nn.Linear(query_dim, dim, bias=False)
        self.query_out = nn.Linear(dim, dim)
        self.gradient_checkpointing = False
        self.memo: PatchMemo | None = None  # shared with another model's encoder (FoveatedVLM.share_frozen)

    @property
    def dim(self) -> int:
        return self.dino.config.hidden_size

    def cls_query(self) -> Tensor:
        """(query_dim,) the query that query_in maps onto DINOv2's CLS embedding (least squares when query_dim
        < dim). Such a query is the CLS token at every layer, since both attend to the same [CLS, patches]
        keys, so its read is the backbone's own summary of the frame, which already separates colours."""
        e = self.dino.embeddings
        target = (e.cls_token[0, 0] + e.position_embeddings[0, 0]).double()  # (D,)
        w = self.query_in.weight.double()  # (D, query_dim)
        return torch.linalg.lstsq(w, target.unsqueeze(1)).solution.squeeze(1).to(self.query_in.weight.dtype)

    @staticmethod
    def _heads(layer: nn.Module, proj: nn.Module, x: Tensor) -> Tensor:
        """x (N, S, D) through one of the layer's projections -> (N, heads, S, head_dim)."""
        att = layer.attention
        return proj(x).view(*x.shape[:2], att.num_attention_heads, att.head_dim).transpose(1, 2)

    def _patch_layer(self, layer: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        att = layer.attention
        n, s, d = h.shape
        x = layer.norm1(h)
        q, k, v = (self._heads(layer, p, x) for p in (att.q_proj, att.k_proj, att.v_proj))
        drop = att.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=att.scaling)  # (N, H, S, hd)
        h = h + layer.drop_path(layer.layer_scale1(att.o_proj(a.transpose(1, 2).reshape(n, s, d))))
        h = h + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(h))))
        return h, k, v

    def encode_patches(self, frames: Tensor) -> PatchCache:
        """frames (N, 3, H, W), ImageNet-normalised -> the per-layer patch cache of all N frames (the memo's, when
        another encoder sharing it has just encoded the same frames through these frozen weights).

        The deep read takes only each layer's keys and values, so of the last layer only those are computed:
        its attention and MLP over the patches (about 7 % of the pass) feed nothing but the final features, which
        only the shallow read uses."""
        frozen = not (torch.is_grad_enabled() and any(p.requires_grad for p in self.dino.parameters()))
        memo = self.memo if frozen and not frames.requires_grad else None
        cached = memo.get(self, frames) if memo is not None else None
        if cached is not None:
            return cached
        cache = self._encode(frames)
        if memo is not None:
            memo.put(self, frames, cache)
        return cache

    def _encode(self, frames: Tensor) -> PatchCache:
        h = self.dino.embeddings(frames)  # (N, 1+P, D)
        keys, values = [], []
        *layers, last = self.dino.encoder.layer
        if not self.deep:
            layers.append(last)
        for layer in layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, k, v = checkpoint(self._patch_layer, layer, h, use_reentrant=False)
            else:
                h, k, v = self._patch_layer(layer, h)
            keys.append(k)
            values.append(v)
        if not self.deep:
            return PatchCache(keys, values, self.dino.layernorm(h))
        x = last.norm1(h)
        att = last.attention
        keys.append(self._heads(last, att.k_proj, x))
        values.append(self._heads(last, att.v_proj, x))
        return PatchCache(keys, values, None)

    def query_attend(self, queries: Tensor, cache: PatchCache) -> tuple[Tensor, Tensor]:
        """queries (N, k, query_dim), one row of k queries per cached frame.

        Returns the tokens (N, k, D) and the last layer's attention over [CLS, patches],
        averaged over heads (N, k, 1+P), for visualisation and entropy.
        """
        h = self.query_in(queries)  # (N, k, D)
        if self.deep:
            for layer, keys, values in zip(self.dino.encoder.layer, cache.keys, cache.values, strict=True):
                att = layer.attention
                n, k, d = h.shape
                q = (
                    att.q_proj(layer.norm1(h)).view(n, k, att.num_attention_heads, att.head_dim).transpose(1, 2)
                )  # (N, H, k, hd)
                w = torch.softmax((q @ keys.transpose(-1, -2)) * att.scaling, dim=-1)  # (N, H, k, 1+P)
                a = (w @ values).transpose(1, 2).reshape(n, k, d)
                h = h + layer.layer_scale1(att.o_proj(a))
                h = h + layer.layer_scale2(layer.mlp(layer.norm2(h)))
            out = self.dino.layernorm(h)
            attn = w.mean(1)
        else:  # shallow ablation: one single-head cross-attention over the final features
            feats = cache.features  # (N, 1+P, D)
            attn = torch.softmax((h @ feats.transpose(-1, -2)) * self.dim**-0.5, dim=-1)  # (N, k, 1+P)
            out = attn @ feats
        return self.query_out(out), attn
