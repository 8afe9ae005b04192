"""The training step compiles to one graph (torch.compile(fullgraph=True)) and gives the eager loss and gradients.

The step is what train.py compiles and vlm/loss.py's batch_losses calls: the model's forward with labels and
logits=False, on the batch batch_losses has cut after its last labelled column, under vlm.base.configure_compile's
settings. It is taken in every read of the foveated model with the frames before the text (start) and after the chat
template's opening (user_turn), in the training read with the frames after the question (after_question), and in a
tower + connector model; with the auxiliary coarse loss and activation checkpointing on, so that every pass of a step
is in the graph. fp32 on the CPU; a ragged batch: clips of 3, 1 and 0 frames, right-padded text.

The backend is aot_eager: dynamo's capture and AOTAutograd's joint forward-backward graphs, run without inductor's
code generation, which would take minutes of this suite for the same graphs (inductor itself is tested on the
decode step, tests/test_static_cache.py; FVLM_COMPILE_BACKEND=inductor runs these through it). Each compile takes
5 to 30 s here: the file takes about 2 minutes on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

from config import MODES
from inputs.tokenization import IGNORE_INDEX, chat_ids
from tests.tiny import frames, tiny_connector_model, tiny_model
from vlm.base import COMPILE_OPTIONS, configure_compile
from vlm.loss import batch_losses, cut_to_labels

BACKEND = os.environ.get("FVLM_COMPILE_BACKEND", "aot_eager")
LOSS_TOL = 1e-5  # absolute, on losses of 4 to 17 (fp32)
GRAD_ATOL, GRAD_RTOL = 2e-5, 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def compiler():
    """configure_compile's settings for the test and the process's own back after it; no graph kept from another."""
    torch._dynamo.reset()
    dynamo, inductor = ({name: not value for name, value in COMPILE_OPTIONS[c].items()} for c in ("dynamo", "inductor"))
    with torch._dynamo.config.patch(dynamo), torch._inductor.config.patch(inductor):
        configure_compile()
        yield
    torch._dynamo.reset()


def batch(tokenizer=None) -> dict[str, torch.Tensor]:
    """Three clips of 3, 1 and 0 frames; answer-only labels on chat text (a tokenizer), else columns 2 to 5 of random
    text, the last row padded. The columns after the last label are cut before the step."""
    fm = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    if tokenizer is None:
        ids = torch.randint(3, 64, (3, 8), generator=torch.Generator().manual_seed(0))
        am = torch.ones_like(ids)
        am[2, 5:] = 0
        labels = ids.masked_fill(am == 0, IGNORE_INDEX)
        labels[:, :2] = labels[:, 6:] = IGNORE_INDEX
    else:
        rows = [("What colour is the ball?", "Red."), ("Hi", "A longer answer, in words."), ("Why?", "No.")]
        rows = [chat_ids(tokenizer, q, a, stage=2) for q, a in rows]
        n = max(len(x) for x, _ in rows)
        ids = torch.full((3, n), tokenizer.pad_token_id)
        am = torch.zeros(3, n, dtype=torch.long)
        labels = torch.full((3, n), IGNORE_INDEX)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)], am[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return {"frames": frames(3, 3), "frame_mask": fm, "input_ids": ids, "attention_mask": am, "labels": labels}


def step(model, data, read, compiled) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The losses of one training step and the gradients it leaves: eager, compiled anew (True) or through a
    compiled `model` given."""
    model.zero_grad(set_to_none=True)
    forward = model if compiled is False else compiled
    if compiled is True:
        forward = torch.compile(model, fullgraph=True, backend=BACKEND)
    losses = batch_losses(forward, data, read)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def check(model, data, read) -> None:
    """No graph break (explain), one graph (fullgraph=True compiles), the eager losses and gradients."""
    model.train().checkpoint_activations()
    cut = cut_to_labels(model, data)
    assert cut["input_ids"].shape[1] < data["input_ids"].shape[1]  # the step runs the cut batch
    start = {n: b.clone() for n, b in model.named_buffers()}  # running statistics a step adds its batch to
    explained = torch._dynamo.explain(model)(**cut, logits=False, **read)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    model.load_state_dict(start, strict=False)
    losses, grads = step(model, data, read, compiled=False)
    after = {n: b.clone() for n, b in model.named_buffers()}
    model.load_state_dict(start, strict=False)
    compiled_losses, compiled_grads = step(model, data, read, compiled=True)
    for name, b in model.named_buffers():
        assert torch.allclose(b, after[name]), name
    assert losses.keys() == compiled_losses.keys()
    for name, value in losses.items():
        assert abs(float(value - compiled_losses[name])) <= LOSS_TOL, name
    assert grads.keys() == compiled_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert torch.allclose(compiled_grads[name], g, atol=GRAD_ATOL, rtol=GRAD_RTOL), (
            name,
            float((compiled_grads[name] - g).abs().max()),
            float(g.abs().max()),
        )


@pytest.mark.parametrize("frames_at", ["start", "user_turn"])
@pytest.mark.parametrize("mode", MODES)
def test_the_foveated_step_compiles_to_one_graph_equal_to_eager(request, frames_at, mode):
    """The auxiliary coarse loss in coarse_fine (pass 1 is its pass), and in autoregressive once (a coarse_only
    forward of its own, as the coarse_only cases compile it)."""
    tokenizer = None if frames_at == "start" else request.getfixturevalue("tokenizer")
    weight = 0.5 if mode == "coarse_fine" or frames_at == "start" else 0.0
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at=frames_at, coarse_weight=weight)
    read = {"mode": mode}
    check(model, batch(tokenizer), read)
    terms = {"fine_loss", "coarse_loss"} if weight and mode != "coarse_only" else set()
    assert set(batch_losses(model, batch(tokenizer), read)) == {"loss", *terms}


@pytest.mark.parametrize("head", ["shared", "standardised"])
def test_the_question_first_step_compiles_to_one_graph_equal_to_eager(tokenizer, head):
    """frames_at after_question: the width of the left-padded questions is read from the data (a symbolic size), and
    frame 0's query is written from each row's question; the standardised head's statistics take the batch in, as
    eager's do."""
    model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="after_question", coarse_weight=0.5,
                       question_query=head)  # fmt: skip
    if head == "standardised":  # statistics and a weight such that the question moves the queries
        with torch.no_grad():
            model.question_norm.var.uniform_(0.5, 2.0)
            model.question_norm.seen.fill_(2)
            model.question_to_query.weight.normal_(0, 0.5)
    check(model, batch(tokenizer), {"mode": "coarse_fine"})


def test_a_tower_step_compiles_to_one_graph_equal_to_eager():
    """TokenLearner + Q-Former on a CLIP tower: the kind whose connector also scatters its maps."""
    check(tiny_connector_model("tokenlearner_qformer", family="clip"), batch(), {})


def test_batches_of_other_shapes_compile_to_one_graph_again():
    """Training batches differ in clips, frames and text length: the step compiled for one batch is compiled again
    for the next with those sizes symbolic, in one graph again, equal to eager."""
    model = tiny_model(glimpses=2).train()
    read = {"mode": "coarse_only"}
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    other = {k: v[:2] for k, v in batch().items()}  # two clips,
    other["frames"], other["frame_mask"] = other["frames"][:, :2], other["frame_mask"][:, :2]  # of 2 and 1 frames
    other["labels"][:, 5:] = IGNORE_INDEX  # cut after column 4
    for data in (batch(), other):
        (loss, grads), (compiled_loss, compiled_grads) = (step(model, data, read, c) for c in (False, compiled))
        assert abs(float(loss["loss"] - compiled_loss["loss"])) <= LOSS_TOL
        assert grads.keys() == compiled_grads.keys()
        for name, g in grads.items():
            assert torch.allclose(compiled_grads[name], g, atol=GRAD_ATOL, rtol=GRAD_RTOL), name


def test_the_cut_before_the_step_is_the_forwards_own(tokenizer):
    """batch_losses cuts the batch as the eager forward cuts it itself: the same loss, to the bit; a batch without
    `frames` (SmolVLM's: images as tokens in the text) is not cut."""
    for model, data in ((tiny_model(glimpses=2), batch()),
                        (tiny_model(tokenizer=tokenizer, frames_at="after_question"), batch(tokenizer))):  # fmt: skip
        cut = cut_to_labels(model, data)
        assert cut["input_ids"].shape[1] < data["input_ids"].shape[1]
        for mode in MODES:
            whole = model(**data, logits=False, mode=mode).loss
            assert torch.equal(batch_losses(model, data, {"mode": mode})["loss"], whole)
        text = {k: v for k, v in data.items() if not k.startswith("frame")}
        assert cut_to_labels(model, text) is text
