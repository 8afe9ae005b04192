"""Training objectives on a collated batch: next-token cross-entropy (stages 1-2) and DPO (stage 3).

DPO (Rafailov et al. 2023) compares the summed log-probability of the chosen and the rejected answer
under the policy with the same quantities under a frozen reference copy of the starting policy:
loss = -log σ(β · [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]), which is log 2 while the
policy still equals the reference. Chosen and rejected run as one batch of 2B text rows over the B clips
(each clip encoded and read once, both of its rows reading it), so that each step is a single forward
through the (possibly DDP-wrapped) model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenization import IGNORE_INDEX


def _pad_cat(a: Tensor, b: Tensor, value: int) -> Tensor:
    """(B, La), (B, Lb) -> (2B, max(La, Lb)), right-padded with `value`."""
    length = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(x, (0, length - x.shape[1]), value=value) for x in (a, b)])


def pair_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A DPO batch -> one batch of B clips and 2B text rows: the chosen answers, then the rejected ones. The
    clips' own tensors (frames, or a SmolVLM batch's pixels) pass through; `rows` (2B,) names each row's clip."""
    text = ("input_ids", "attention_mask", "labels")
    pairs = {k: v for k, v in batch.items() if not k.startswith(("chosen_", "rejected_"))}
    b = batch["chosen_input_ids"].shape[0]
    pairs["rows"] = torch.arange(b, device=batch["chosen_input_ids"].device).repeat(2)
    for key, pad in zip(text, (0, 0, IGNORE_INDEX), strict=True):
        pairs[key] = _pad_cat(batch[f"chosen_{key}"], batch[f"rejected_{key}"], pad)
    return pairs


def answer_logp(model: nn.Module, batch: dict[str, Tensor], read: dict[str, Any]) -> Tensor:
    """Summed log-probability of the labelled tokens of each row: (R,)."""
    return -model(**batch, logits=False, **read).nll


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> Tensor:
    """policy, reference (2B,) answer log-probs, chosen rows first -> mean DPO loss."""
    chosen, rejected = (policy - reference).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def batch_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    read: dict[str, Any] | None = None,
    reference: nn.Module | None = None,
    beta: float = 0.1,
) -> Tensor:
    """Cross-entropy over the labelled tokens, or with a `reference` model the DPO loss of a pair batch.

    `model` may be DDP-wrapped: it is only ever called, with the batch's tensors as keyword arguments and the
    read's options (the foveated model's mode), so DDP sees every forward."""
    read = read or {}
    if reference is None:
        return model(**batch, logits=False, **read).loss
    pairs = pair_batch(batch)
    policy = answer_logp(model, pairs, read)
    with torch.no_grad():
        ref = answer_logp(reference, pairs, read)
    return dpo_loss(policy, ref, beta)
