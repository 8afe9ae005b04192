"""The loss, for every kind and every use: the NLL of labelled tokens (training, validation, option scoring),
next-token cross-entropy on a collated batch (stages 1-2) and DPO (stage 3).

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

from inputs.tokenization import IGNORE_INDEX


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed negative log-likelihood of the labelled tokens, and their count: (R,), (R,).
    Position j of `logits` (R, L, V) predicts token j+1 of `labels` (R, L)."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target.clamp(min=0), reduction="none")  # (R, L-1)
    keep = target != IGNORE_INDEX
    return (nll * keep).sum(1), keep.sum(1)


def head_nll(head: Any, hidden: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed NLL and count (R,), (R,) of the labelled `target` (R, L), token i predicted from
    `hidden` (R, L, D) at i, through `head` (the LM head) at the labelled positions only."""
    keep = target != IGNORE_INDEX
    rows, cols = keep.nonzero().unbind(1)  # how many is read from the data: compiled, a symbolic size
    loss = F.cross_entropy(head(hidden[rows, cols]).float(), target[rows, cols], reduction="none")
    nll = hidden.new_zeros(len(hidden), dtype=torch.float32).index_add(0, rows, loss)
    return nll, keep.sum(1)


def labelled_nll(
    head: Any,
    hidden: Tensor,
    labels: Tensor,
    bridge: Tensor | None = None,
    framed: Tensor | None = None,
    cut: Tensor | int = 0,
) -> tuple[Tensor, Tensor]:
    """Per-row summed NLL of the labelled tokens and their count, (R,), (R,), from final hidden states (R, L, D)
    through `head` (the LM head), computed only where a label asks: in stage 2 a handful of answer tokens, not
    the whole vocabulary at every position.

    Each token is predicted from the position just before it in the sequence the LLM read, [text[:cut], frame
    slots, text[cut:]] (`cut` one column for all rows, or (R,) each row's): in a row with frames (`framed`),
    text[cut] is predicted by the last frame slot (`bridge` (R, D), its hidden state) rather than by text[cut-1];
    the slots themselves predict nothing."""
    r, length = labels.shape
    target = labels[:, 1:]  # position j predicts token j+1
    if bridge is None:
        return head_nll(head, hidden[:, :-1], target)
    cut = torch.as_tensor(cut, device=labels.device).expand(r)
    inside = framed & (cut < length)
    if length > 1:  # text[cut] is not predicted by text[cut - 1] where frames stand between them
        col = (cut - 1).clamp(0, length - 2)[:, None]
        moved = inside & (cut >= 1)
        target = target.scatter(1, col, torch.where(moved[:, None], IGNORE_INDEX, target.gather(1, col)))
    nll, count = head_nll(head, hidden[:, :-1], target)
    first = labels.gather(1, cut.clamp(max=length - 1)[:, None])[:, 0] if length else cut
    ok = inside & (first != IGNORE_INDEX)
    # every row's bridge (R of them: cheap), kept where it predicts a label: no size that depends on the data
    extra = F.cross_entropy(head(bridge).float(), torch.where(ok, first, 0), reduction="none")
    return nll + torch.where(ok, extra, 0.0), count + ok


def through_labels(input_ids: Tensor, attention_mask: Tensor, labels: Tensor, head: int) -> tuple[Tensor, ...]:
    """(R, L) ids, mask and labels cut after the last labelled column: under causal attention the tokens after it
    change no prediction of a labelled token, so a loss without logits need not run them (a stage-2 row's end
    of turn, a short row padded to a long one's length). Uncut when no column after the head is labelled."""
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    end = int(labelled[-1]) + 1 if len(labelled) else 0
    if head < end < labels.shape[1]:
        return input_ids[:, :end], attention_mask[:, :end], labels[:, :end]
    return input_ids, attention_mask, labels


def _reader(model: nn.Module) -> nn.Module | None:
    """The VLM inside torch.compile's, DDP's or FSDP's wrapper (None for a module that is none)."""
    while model is not None and not hasattr(model, "lead_columns"):
        inner = getattr(model, "_orig_mod", None)
        model = inner if inner is not None else getattr(model, "module", None)
    return model


def cut_to_labels(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """`batch` with its text cut after the last labelled column, as the model's forward cuts it without logits
    (`through_labels`): done before the call, so that a compiled forward, which leaves the cut out (its width is
    read from the data), runs the same columns. A SmolVLM batch (no `frames`: its images are <image> tokens in the
    text) is left whole, as its forward leaves it."""
    vlm = _reader(model)
    if vlm is None or "frames" not in batch or "labels" not in batch:
        return batch
    keep = vlm.lead_columns(batch["input_ids"], batch["attention_mask"])
    ids, mask, labels = through_labels(batch["input_ids"], batch["attention_mask"], batch["labels"], keep)
    return {**batch, "input_ids": ids, "attention_mask": mask, "labels": labels}


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


def batch_losses(
    model: nn.Module,
    batch: dict[str, Tensor],
    read: dict[str, Any] | None = None,
    reference: nn.Module | None = None,
    beta: float = 0.1,
) -> dict[str, Tensor]:
    """The loss a step minimises ("loss": cross-entropy over the labelled tokens, or with a `reference` model the
    DPO loss of a pair batch) and, where the model's loss is a sum of terms (the foveated model's fine + coarse),
    each term under its own name, so that a log never mixes them.

    `model` may be DDP-wrapped or compiled: it is only ever called, with the batch's tensors (cut after the last
    label: `cut_to_labels`, which reads the wrapped model's layout) as keyword arguments and the read's options (the
    foveated model's mode), so DDP sees every forward."""
    read = read or {}
    if reference is None:
        out = model(**cut_to_labels(model, batch), logits=False, **read)
        return {"loss": out.loss, **out.terms}
    pairs = cut_to_labels(model, pair_batch(batch))
    policy = answer_logp(model, pairs, read)
    with torch.no_grad():
        ref = answer_logp(reference, pairs, read)
    return {"loss": dpo_loss(policy, ref, beta)}


def batch_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    read: dict[str, Any] | None = None,
    reference: nn.Module | None = None,
    beta: float = 0.1,
) -> Tensor:
    """The loss a step minimises (see `batch_losses`)."""
    return batch_losses(model, batch, read, reference, beta)["loss"]
