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

A compiled decode step is specialised to its cache's shapes, and a CUDA graph to its buffers' addresses, so a new
cache per `generate` call would be compiled or recorded again each call. `StaticKV.claim` hands out one kept cache
per model (its decoder) and length bucket (`slots_for`: the next power of two), reset rather than reallocated;
each layer keeps its buffers for every batch shape it has held (`KeptLayer`), so a batch of 3 and its beams (3·K
rows) each find their own again at every call. A cache claimed again is the previous one, emptied: a static prefix
is good until the next static prefix of the same model (generate uses its one within the call).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer


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


MIN_SLOTS = 64  # the smallest kept cache


def slots_for(length: int) -> int:
    """The slots of the kept cache that holds `length` tokens: the next power of two, at least MIN_SLOTS. Prompts
    of nearby lengths share one cache and so one compiled decode step, for at most twice the (masked) slots."""
    return max(MIN_SLOTS, 1 << max(length - 1, 0).bit_length())


class KeptLayer(StaticLayer):
    """A StaticLayer that keeps the buffers of every batch shape (and dtypes, device) it has held: taking a shape up
    again zeroes its old buffers in place, so their addresses, which a CUDA graph holds, stay the same.

    Under autocast the keys and values of one layer can differ in dtype (the keys come out of the rotary embedding
    in the dtype of the LLM's input, fp32 text embeddings or bf16 visual tokens; the values stay the projection's
    bf16), and so can two calls' keys: the values get a buffer of their own dtype, and each write is cast to its
    buffer's (attention casts them to bf16 all the same)."""

    def __init__(self, max_cache_len: int) -> None:
        super().__init__(max_cache_len)
        # (batch, heads, key dim, value dim, key dtype, value dtype, device) -> keys, values, slots written
        self.kept: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, heads, dk, dv = *key_states.shape[:2], key_states.shape[-1], value_states.shape[-1]
        shape = (b, heads, dk, dv, key_states.dtype, value_states.dtype, key_states.device)
        if shape not in self.kept:
            # normal tensors even under inference_mode: a later call without it (no_grad) writes them in place
            with torch.inference_mode(False):
                self.cumulative_length = torch.zeros((), dtype=torch.long)  # each shape its own counter
                super().lazy_initialization(key_states, value_states)  # allocates and marks the static addresses
                if self.values.dtype != value_states.dtype:  # allocated in the keys' dtype
                    self.values = torch.zeros_like(self.values, dtype=value_states.dtype)
                    torch._dynamo.mark_static_address(self.values)
            self.kept[shape] = self.keys, self.values, self.cumulative_length
            return
        self.keys, self.values, self.cumulative_length = self.kept[shape]
        for t in self.kept[shape]:
            t.zero_()
        self.dtype, self.device, self.batch_size, self.num_heads = key_states.dtype, key_states.device, b, heads
        self.k_head_dim, self.v_head_dim = dk, dv
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.is_initialized:
            key_states, value_states = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
        return super().update(key_states, value_states, *args, **kwargs)


# decoder -> its kept static caches by slots; weak, so a model's caches go with it (and a deepcopy has none)
_KEPT: weakref.WeakKeyDictionary[nn.Module, dict[int, StaticKV]] = weakref.WeakKeyDictionary()


class StaticKV(StaticCache):
    """A preallocated KV cache of `length` slots for inference (see the module docstring)."""

    def __init__(self, config: Any, length: int) -> None:
        super().__init__(config=config, max_cache_len=length)
        if any(type(layer) is not StaticLayer for layer in self.layers):  # sliding windows would not see all slots
            raise ValueError("the static KV cache needs an LLM whose every layer attends to all of the past")
        with torch.inference_mode(False):  # the slot counters are written in place, in or out of inference_mode
            self.layers = [KeptLayer(length) for _ in self.layers]
        self.length = length

    @classmethod
    def claim(cls, decoder: nn.Module, length: int) -> StaticKV:
        """`decoder`'s kept cache for `length` tokens (`slots_for(length)` slots), emptied: made on the first
        claim, the same object (and, for the same batch shape, the same buffers) at every later one. The cache
        of a previous claim of that bucket is this one: one generation at a time per model."""
        caches = _KEPT.setdefault(decoder, {})
        slots = slots_for(length)
        cache = caches.get(slots)
        if cache is None:
            cache = caches[slots] = cls(decoder.config, slots)
        for layer in cache.layers:
            layer.is_initialized = False  # the next write takes up (and zeroes) the kept buffers of its shape
        return cache

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
        """Move each layer to the kept buffers of the batch `pick`(buffer) makes, holding what it picks (once,
        before decoding starts)."""
        for layer in self.layers:
            if layer.is_initialized:
                keys, values, written = pick(layer.keys), pick(layer.values), layer.cumulative_length.clone()
                layer.is_initialized = False
                layer.lazy_initialization(keys, values)
                layer.keys.copy_(keys)
                layer.values.copy_(values)
                layer.cumulative_length.copy_(written)

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
