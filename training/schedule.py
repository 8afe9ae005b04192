"""Learning-rate schedules: a pure function of the optimizer step, so resuming needs only the step.

Every schedule warms each group linearly up to its own peak over the first `warmup_steps` steps
(the last warmup step is exactly at the peak), then:
- constant: stays at the peak;
- linear: falls in a straight line from the peak to `min_lr_ratio` × peak (transformers'
  get_linear_schedule_with_warmup with min_lr_ratio 0, the SmolVLM TextVQA recipe);
- cosine: follows a half cosine from the peak down to `min_lr_ratio` × peak;
- converging: follows a half cosine from the group's own peak to `target_lr`, shared by all groups,
  so a fast-learning connector and slow backbones end at one common rate (the fVLM stage-1 recipe).
The last step (max_steps - 1) is exactly at the end value.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine", "converging")


class Schedule:
    """Sets each optimizer group's `lr` for a given step from the group's `peak_lr`."""

    def __init__(self, schedule: str, max_steps: int, warmup: float, target_lr: float, min_lr_ratio: float) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{schedule}'; expected one of {SCHEDULES}")
        self.schedule, self.max_steps = schedule, max_steps
        self.warmup_steps = round(warmup * max_steps)
        self.target_lr, self.min_lr_ratio = target_lr, min_lr_ratio

    def lr(self, step: int, peak: float) -> float:
        """Learning rate at optimizer step `step` (0-based) of a group whose peak is `peak`."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return peak
        end = self.target_lr if self.schedule == "converging" else self.min_lr_ratio * peak
        progress = min(1.0, (step - self.warmup_steps + 1) / max(1, self.max_steps - self.warmup_steps))
        if self.schedule == "linear":
            return end + (peak - end) * (1 - progress)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Set every group's lr for `step`; returns {group name: lr} for logging."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr(step, group["peak_lr"])
        return {group["name"]: group["lr"] for group in optimizer.param_groups}
