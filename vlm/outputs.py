"""What a model hands from one stage of reading to the next: a clip's encoding (`Visual`), the LLM state after the
prefix (`Prefix`) and a forward's result (`Output`). Apart from the base so that decoding can name them too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from transformers import DynamicCache

from vlm.kvcache import StaticKV


@dataclass
class Visual:
    """What a model computed from a batch of clips, before any text: reused by every read, option and turn."""

    frame_mask: Tensor  # (B, T) bool, real frames first
    features: Any  # the kind's own (a patch cache, tower outputs, pixel inputs)


def frames_of(frame_mask: Tensor, rows: Tensor, time_major: bool = False) -> Tensor:
    """Where the real frames of clips `rows` (R,) lie among a batch's real frames kept flat (batch-major, or
    time-major: all clips' frame 0, then frame 1, ...), in the order a batch of those clips keeps them: (N_rows,)."""
    order = frame_mask.T if time_major else frame_mask
    index = (order.flatten().long().cumsum(0) - 1).view(order.shape)
    chosen = frame_mask[rows]
    return index[:, rows][chosen.T] if time_major else index[rows][chosen]


@dataclass
class Output:
    logits: Tensor | None  # (R, L, vocab) at the text positions (None when not asked for)
    loss: Tensor | None = None  # mean over every labelled token of the batch
    nll: Tensor | None = None  # (R,) summed negative log-likelihood of each row's labelled tokens
    count: Tensor | None = None  # (R,) labelled tokens per row
    attention: Tensor | None = None  # (B, T, maps, positions): where the read looked, for kinds that know
    terms: dict[str, Tensor] = field(default_factory=dict)  # `loss`'s terms by name, when it is a sum of several


@dataclass
class Prefix:
    """The LLM state after [frames, text]: what generation and option scoring continue from."""

    hidden: Tensor  # (R, L, D) final-norm hidden states at the text positions
    mask: Tensor  # (R, S) attention mask of everything in `past`
    past: DynamicCache | StaticKV | None
    attention: Tensor | None
    last_visual: Tensor  # (R, D) hidden state at each row's last real frame slot (meaningless for rows without)
    framed: Tensor  # (R,) bool: the row's clip has at least one frame slot before text[cut]
    cut: Tensor | int  # (R,) each row's text column right after the frames: the tokens before it are its lead
    frame_hidden: Tensor | None = None  # (R, T*S, D) hidden states at the frame slots (parallel reads only)
