"""KV caches for loops that train: one LLM call's view of a cache that activation checkpointing can replay.

transformers' checkpointed decoder layers recompute their forward during backward. On a plain `DynamicCache`
the replay would append the call's keys a second time (so transformers drops the cache in checkpointed layers
instead, and a loop that feeds its own cache, like the foveated model's frame-by-frame read, silently loses
its past). `StepCache` is what one call writes into: every layer's update concatenates onto the past *as it
was when the call began*, so a replay in backward rebuilds exactly the keys and values the forward saw. After
the call `commit` hands the new state back to the caller's ordinary cache, which keeps the usual semantics
for everything else (generation, option scoring, batch selection).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _layer(keys: Tensor, values: Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


class StepCache(DynamicCache):
    """A replay-safe view of `past` for a single LLM call (see the module docstring)."""

    def __init__(self, past: DynamicCache) -> None:
        super().__init__()
        # (B, H_kv, S_past, hd) per layer, frozen for this call; replays read the same tensors
        self.frozen = [(layer.keys, layer.values) if layer.is_initialized else None for layer in past.layers]
        self.layers = [_layer(*kv) if kv is not None else DynamicLayer() for kv in self.frozen]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, ...]:
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
            self.frozen.append(None)
        past = self.frozen[layer_idx]
        if past is None:
            keys, values = key_states, value_states
        else:
            keys, values = torch.cat([past[0], key_states], dim=-2), torch.cat([past[1], value_states], dim=-2)
        self.layers[layer_idx] = _layer(keys, values)  # overwritten, not appended, on a replay
        return keys, values

    def commit(self, past: DynamicCache) -> None:
        """Make `past` hold what this call left: its past plus the call's new keys and values."""
        while len(past.layers) < len(self.layers):
            past.layers.append(DynamicLayer())
        for i, layer in enumerate(self.layers):
            if layer.is_initialized:
                past.layers[i] = _layer(layer.keys, layer.values)
