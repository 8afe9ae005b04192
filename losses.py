"""Training objectives on a collated batch: next-token cross-entropy (stages 1-2) and DPO (stage 3).

DPO (Rafailov et al. 2023) compares the summed log-probability of the chosen and the rejected answer
under the policy with the same quantities under a frozen reference copy of the starting policy:
loss = -log σ(β · [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]), which is log 2 while the
policy still equals the reference. Chosen and rejected run as one batch of 2B text rows over the B clips
(each clip encoded and read once, both of its rows reading it), so that each step is a single forward
through the (possibly DDP-wrapped) model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenization import IGNORE_INDEX


def _pad_cat(a: Tensor, b: Tensor, value: int) -> Tensor:
    """(B, La), (B, Lb) -> (2B, max(La, Lb)), right-padded with `value`."""
    length = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(x, (0, length - x.shape[1]), value=value) for x in (a, b)])


def pair_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A DPO batch -> one batch of B clips and 2B text rows: the chosen answers, then the rejected ones."""
    b = batch["frames"].shape[0]
    return {
        "frames": batch["frames"],
        "frame_mask": batch["frame_mask"],
        "rows": torch.arange(b, device=batch["frames"].device).repeat(2),  # (2B,) the clip of each row
        "input_ids": _pad_cat(batch["chosen_input_ids"], batch["rejected_input_ids"], 0),
        "attention_mask": _pad_cat(batch["chosen_attention_mask"], batch["rejected_attention_mask"], 0),
        "labels": _pad_cat(batch["chosen_labels"], batch["rejected_labels"], IGNORE_INDEX),
    }


def answer_logp(model: nn.Module, batch: dict[str, Tensor], mode: str) -> Tensor:
    """Summed log-probability of the labelled tokens of each row: (R,)."""
    keys = ("frames", "frame_mask", "input_ids", "attention_mask", "labels")
    return -model(*(batch[k] for k in keys), mode=mode, rows=batch["rows"]).nll


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> Tensor:
    """policy, reference (2B,) answer log-probs, chosen rows first -> mean DPO loss."""
    chosen, rejected = (policy - reference).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def batch_loss(
    model: nn.Module, batch: dict[str, Tensor], mode: str, reference: nn.Module | None = None, beta: float = 0.1
) -> Tensor:
    """Cross-entropy over the labelled tokens, or with a `reference` model the DPO loss of a pair batch."""
    if reference is None:
        keys = ("frames", "frame_mask", "input_ids", "attention_mask", "labels")
        return model(*(batch[k] for k in keys), mode=mode).loss
    pairs = pair_batch(batch)
    policy = answer_logp(model, pairs, mode)
    with torch.no_grad():
        ref = answer_logp(reference, pairs, mode)
    return dpo_loss(policy, ref, beta)
