"""Samples → the model's padded batch, and the grouping of samples into batches.

Batch format (the model is written against it):
  frames (B,T_max,3,H,W) float32, frame_mask (B,T_max) bool — T_max may be 0 when all are text-only;
  input_ids (B,L_max) long right-padded with the pad id, attention_mask (B,L_max) long,
  labels (B,L_max) long padded with -100.
A DPO batch has frames/frame_mask plus chosen_input_ids/chosen_attention_mask/chosen_labels and the
same three for rejected_. Padding is marked by the masks, never by the pad id, because SmolLM2's pad
id is its EOS id, a real token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from inputs.tokenization import IGNORE_INDEX

Item = TypeVar("Item")


def pad_text(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Token lists → right-padded input_ids (pad id), attention_mask and labels (-100), all (B, L_max)."""
    b, length = len(ids), max(len(x) for x in ids)
    out = {
        "input_ids": torch.full((b, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(b, length, dtype=torch.long),
        "labels": torch.full((b, length), IGNORE_INDEX, dtype=torch.long),
    }
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        if len(x) != len(y):
            raise ValueError(f"sample {i}: {len(x)} input ids but {len(y)} labels")
        out["input_ids"][i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        out["attention_mask"][i, : len(x)] = 1
        out["labels"][i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
    return out


def pad_frames(clips: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clips (T_i, 3, H, W) -> frames (B, T_max, 3, H, W) zero-padded and frame_mask (B, T_max)."""
    b, t_max = len(clips), max(len(c) for c in clips)
    frames = torch.zeros(b, t_max, *clips[0].shape[1:], dtype=torch.float32)  # (B,T,3,H,W)
    frame_mask = torch.zeros(b, t_max, dtype=torch.bool)  # (B,T)
    for i, c in enumerate(clips):
        frames[i, : len(c)] = c
        frame_mask[i, : len(c)] = True
    return {"frames": frames, "frame_mask": frame_mask}


def pad_views(views: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Each row's image views (N_i, 3, H_i, W_i) and pixel mask (N_i, H_i, W_i), or None for a row without ->
    pixel_values (B, N, 3, H, W) and pixel_attention_mask (B, N, H, W), padded as the Idefics3 image processor
    pads them: missing views are all-zero images (Idefics3 skips those), pixels past a view's own size are zero
    and masked out. Empty when no row has views."""
    real = [v for v, _ in filter(None, views)]
    if not real:
        return {}
    n, h, w = max(len(v) for v in real), max(v.shape[-2] for v in real), max(v.shape[-1] for v in real)
    pixels = torch.zeros(len(views), n, 3, h, w, dtype=real[0].dtype)  # (B, N, 3, H, W)
    mask = torch.zeros(len(views), n, h, w, dtype=torch.long)  # (B, N, H, W)
    for i, row in enumerate(views):
        if row is not None:
            v, m = row
            pixels[i, : len(v), :, : v.shape[-2], : v.shape[-1]] = v
            mask[i, : len(v), : v.shape[-2], : v.shape[-1]] = m
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


def collate(samples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of samples into one batch.

    Each sample holds `frames` (T,3,H,W) (T may be 0) and either `input_ids` + `labels` or, for DPO,
    `chosen_input_ids`/`chosen_labels`/`rejected_input_ids`/`rejected_labels` (lists or 1-D tensors).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch = pad_frames([s["frames"] for s in samples])
    dpo = "chosen_input_ids" in samples[0]
    if any(("chosen_input_ids" in s) != dpo for s in samples):
        raise ValueError("cannot mix preference pairs and plain samples in one batch")
    for prefix in ("chosen_", "rejected_") if dpo else ("",):
        text = pad_text([s[prefix + "input_ids"] for s in samples], [s[prefix + "labels"] for s in samples], pad_id)
        batch.update({prefix + k: v for k, v in text.items()})
    return batch


def group_batches(
    items: Iterable[Item],
    batch_size: int,
    frame_budget: int | None = None,
    frames_of: Callable[[Item], int] = len,
) -> Iterator[list[Item]]:
    """Group a stream into batches of at most batch_size items, in order.

    With a frame budget, a batch also stops growing before its padded frame tensor (items × largest T)
    would exceed frame_budget; an item longer than the budget alone still forms a batch of one.
    """
    batch: list[Item] = []
    widest = 0
    for item in items:
        t = frames_of(item) if frame_budget is not None else 0
        over = frame_budget is not None and (len(batch) + 1) * max(widest, t) > frame_budget
        if batch and (len(batch) == batch_size or over):
            yield batch
            batch, widest = [], 0
        batch.append(item)
        widest = max(widest, t)
    if batch:
        yield batch
