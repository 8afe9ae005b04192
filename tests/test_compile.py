"""A torch.compile'd training step (train.compile) gives the eager loss and gradients: the tiny foveated model,
coarse_fine (the training mode), a ragged batch of clips and right-padded text, fp32 on the CPU.

The backend is aot_eager: dynamo's capture (with the graph breaks at `_read`'s boolean-mask indexing and the
loss's labelled-position selection) and AOTAutograd's joint forward-backward graphs, run without inductor's code
generation, which would take two to three minutes of this suite for the same graphs (inductor itself is tested
on the decode step, tests/test_static_cache.py; FVLM_COMPILE_BACKEND=inductor runs this one through it)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny import frames, tiny_model

BACKEND = os.environ.get("FVLM_COMPILE_BACKEND", "aot_eager")


pytestmark = pytest.mark.usefixtures("single_thread")


def step(compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_model(glimpses=2).train()
    fr, fm = frames(2, 3), torch.tensor([[True, True, True], [True, False, False]])
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 4:] = 0
    labels = ids.masked_fill(am == 0, -100)
    forward = torch.compile(model, backend=BACKEND) if compiled else model
    out = forward(fr, fm, ids, am, labels, logits=False, mode="coarse_fine")
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_training_step_equals_eager():
    loss, grads = step(False)
    compiled_loss, compiled_grads = step(True)
    assert abs(float(loss - compiled_loss)) <= 1e-5
    assert grads.keys() == compiled_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert torch.allclose(compiled_grads[name], g, atol=2e-5, rtol=1e-4), name
