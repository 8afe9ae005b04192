"""RunningNorm: a state standardised feature by feature with running statistics of the states it has seen in training.

Why the foveated model's question-guided first query needs it: SmolLM2-135M's final states at the end of different
questions differ by about an eighth of their norm (pairwise cosine 0.96-0.99 over the binding world's eight questions,
and no parameter-free difference -- minus the words' mean, minus the chat head's state -- does better). A linear head
on the raw state learns the shared direction first and the question's own directions some eighty times slower (the
input covariance's eigenvalues). Standardised, every direction in which the questions differ enters at unit scale.

Unlike batch normalisation, training standardises with the running statistics of the batches before (and then adds
the batch to them), so a row's result never depends on the rows beside it: a padded batch equals each row alone, in
training as in evaluation. Before any batch has been seen there are no statistics, and the state gives zeros. The
statistics are buffers: saved, loaded and resumed with the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RunningNorm(nn.Module):
    def __init__(self, width: int, momentum: float = 0.01, floor: float = 1e-2):
        """`momentum`: the weight of each batch once 1/momentum batches have been seen (a plain average before);
        `floor`: a feature's variance is at least this fraction of the mean variance, so that a feature in which
        the training states hardly differ is not blown up for a state unlike them."""
        super().__init__()
        self.momentum, self.floor = momentum, floor
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))  # kept as a variance, not a raw second moment: the states'
        # shared part is large (|mean| up to ~20 on SmolLM2), and E[x^2] - mean^2 would cancel it away in low precision
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        # what a training forward standardises with, copied from mean and var before they take the batch in: a
        # compiled step (AOTAutograd, torch 2.13) recomputed the scale in the backward from the buffer it had read,
        # by then updated, and sent a wrong gradient to the state; not saved
        self.register_buffer("read", torch.zeros(3, width), persistent=False)  # mean, var, anything seen

    def forward(self, state: Tensor) -> Tensor:
        """state (R, D) -> standardised (R, D) in float32 (zeros while nothing has been seen); in training mode
        (with gradients on) the batch's rows are then added to the statistics."""
        update = self.training and torch.is_grad_enabled() and len(state)
        stats = torch.stack([self.mean.float(), self.var.float(), (self.seen > 0).float().expand_as(self.mean)])
        if update:  # read through the copy (see `read`), then update
            self.read.copy_(stats)
            stats = self.read
        mean, var, any_seen = stats
        out = (state.float() - mean) * ((var + self.floor * var.mean() + 1e-12).rsqrt() * any_seen)
        if update:  # the pooled variance of (running, batch) weighted (1 - rate, rate)
            with torch.no_grad():
                state = state.detach().float()
                rate = (1.0 / (self.seen + 1).float()).clamp(min=self.momentum)
                shift = state.mean(0) - mean
                batch = state.var(0, unbiased=False)
                self.var.copy_((1 - rate) * var + rate * batch + rate * (1 - rate) * shift.square())
                self.mean.copy_(mean + rate * shift)
                self.seen += 1
        return out
