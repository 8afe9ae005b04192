"""KV caches: one LLM call's view of a cache that activation checkpointing can replay, and a static one for inference.

transformers' checkpointed decoder layers recompute their forward during backward. On a plain `DynamicCache`
the replay would append the call's keys a second time (so transformers drops the cache in checkpointed layers
instead, and a loop that feeds its own cache, like the foveated model's frame-by-frame read, silently loses
its past). `StepCache` is what one call writes into: every layer's update concatenates onto the past *as it
was when the call began*, so a replay in backward rebuilds exactly the keys and values the forward saw. After
the call `commit` hands the new state back to the caller's ordinary cache, which keeps the usual semantics
for everything else (generation, option scoring, batch selection).

`StaticKV` is inference's alternative (torch.no_grad only): every layer's keys and values live in one buffer
(B, H_kv, N, hd) allocated for the whole run (prefix + new tokens), written in place at the slot after the last
one written, so a decode step has the same shapes every time (what torch.compile's CUDA graphs need). Slot i
of the buffer is column i of the caller's 2D mask, as in the dynamic cache, so padded slots stay masked and
positions stay the caller's. Attention runs over all N slots: the unwritten ones lie after every query, so
transformers' causal mask (queries offset by the slots written, `cumulative_length`) already excludes them,
and `pad` zero-extends the mask to N columns as well, which keeps the step's mask one fixed shape (left
shorter, transformers pads it the same way, but it grows by a column each token). Masked keys weigh exactly
0; what differs from the dynamic cache is only the order of the sums over the longer rows (~1e-6 in fp32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer


def kv_layer(keys: Tensor, values: Tensor) -> DynamicLayer:
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
        self.layers = [kv_layer(*kv) if kv is not None else DynamicLayer() for kv in self.frozen]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, ...]:
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
            self.frozen.append(None)
        past = self.frozen[layer_idx]
        if past is None:
            keys, values = key_states, value_states
        else:
            keys, values = torch.cat([past[0], key_states], dim=-2), torch.cat([past[1], value_states], dim=-2)
        self.layers[layer_idx] = kv_layer(keys, values)  # overwritten, not appended, on a replay
        return keys, values

    def commit(self, past: DynamicCache) -> None:
        """Make `past` hold what this call left: its past plus the call's new keys and values."""
        while len(past.layers) < len(self.layers):
            past.layers.append(DynamicLayer())
        for i, layer in enumerate(self.layers):
            if layer.is_initialized:
                past.layers[i] = kv_layer(layer.keys, layer.values)


def _decode(decoder: nn.Module, embeds: Tensor, mask: Tensor, position_ids: Tensor, past: StaticKV) -> Tensor:
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, past_key_values=past,
                  use_cache=True)  # fmt: skip
    return out.last_hidden_state


@functools.cache
def _compiled() -> Callable[..., Tensor]:
    """`_decode` under torch.compile, made on first use (importing torch's compiler is not free). With fixed
    shapes (one token per row on a StaticKV) it compiles once per batch size; "reduce-overhead" adds CUDA graphs
    on a GPU (on a CPU it is plain inductor)."""
    return torch.compile(_decode, mode="reduce-overhead", dynamic=False)


class StaticKV(StaticCache):
    """A preallocated KV cache of `length` slots for inference (see the module docstring)."""

    def __init__(self, config: Any, length: int) -> None:
        super().__init__(config=config, max_cache_len=length)
        self.length = length

    def pad(self, mask: Tensor) -> Tensor:
        """mask (B, S) over the slots written before and by this call -> (B, N), the unwritten slots masked out."""
        if mask.shape[1] > self.length:
            raise ValueError(f"the static KV cache holds {self.length} tokens; this call needs {mask.shape[1]}")
        return F.pad(mask, (0, self.length - mask.shape[1]))

    def run(
        self, decoder: nn.Module, embeds: Tensor, mask: Tensor, position_ids: Tensor, compiled: bool = False
    ) -> Tensor:
        """One decoder call writing into this cache: embeds (B, S_new, D), `mask` (B, S) over past + new and the
        new slots' `position_ids` (B, S_new) -> final-norm hidden states (B, S_new, D); `compiled`: through
        torch.compile (for the one-token decode step)."""
        call = _compiled() if compiled else _decode
        # contiguous: a position slice's stride grows with the mask, and torch.compile would recompile each step
        return call(decoder, embeds, self.pad(mask), position_ids.contiguous(), self)

    def _rebatch(self, pick: Callable[[Tensor], Tensor]) -> None:
        """Replace each layer's buffers by `pick`(buffer) along the batch (once, before decoding starts)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = pick(layer.keys), pick(layer.values)
                layer.batch_size = layer.keys.shape[0]
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._rebatch(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebatch(lambda x: x.repeat_interleave(repeats, dim=0))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search's reorder, in place: the buffers keep their addresses."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys.copy_(layer.keys[beam_idx])
                layer.values.copy_(layer.values[beam_idx])
