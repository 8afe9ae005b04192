"""Attention pictures: sizes, where the bright spot lands, entropy, the model's attention read, and the frame shown
untouched beside its maps (its colours never tinted)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image

from evals.attention_viz import (
    beside,
    entropy,
    grey,
    patch_maps,
    read_attention,
    read_attentions,
    save_attention,
    stack_strips,
    to_uint8,
)
from inputs.frames import IMAGENET_MEAN, IMAGENET_STD
from tests.tiny import frames, tiny_model


def grey_frames(t: int, size: int) -> torch.Tensor:
    """Uniform mid-grey frames, ImageNet-normalised: any brightness difference comes from the overlay."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((torch.full((t, 3, size, size), 0.5) - mean) / std).contiguous()


def test_to_uint8_undoes_the_normalisation():
    assert (to_uint8(grey_frames(2, 28)) == 128).all()


def test_picture_sizes_and_bright_spot_over_the_most_attended_patch(tmp_path):
    t, grid, patch, scale = 3, 4, 14, 2
    size = grid * patch
    peaks = [(0, 0), (1, 2), (3, 3)]  # (row, col) of each frame's most attended patch
    attention = torch.full((t, 1, 1 + grid * grid), 0.01)  # (T, k, 1+P): CLS + patches
    attention[:, :, 0] = 0.5  # a heavy CLS weight must not shift the picture
    for i, (r, c) in enumerate(peaks):
        attention[i, 0, 1 + r * grid + c] = 0.4
    summary = save_attention(grey_frames(t, size), attention, tmp_path / "clip", patch=patch, scale=scale)

    strip = Image.open(tmp_path / "clip.png")
    assert strip.size == (t * size * scale, size * scale)
    gif = Image.open(tmp_path / "clip.gif")
    assert gif.size == (size * scale, size * scale) and gif.n_frames == t
    luminance = np.asarray(strip.convert("L"), dtype=np.float32)
    cell = size * scale
    for i, peak in enumerate(peaks):
        frame = luminance[:, i * cell : (i + 1) * cell]
        blocks = frame.reshape(grid, patch * scale, grid, patch * scale).mean((1, 3))  # mean brightness per patch
        assert np.unravel_index(blocks.argmax(), blocks.shape) == peak
    assert summary["peak_patch"] == [[list(p)] for p in peaks]
    assert json.loads((tmp_path / "clip.json").read_text()) == summary


def test_glimpses_are_rows_of_the_strip(tmp_path):
    attention = torch.rand(2, 3, 1 + 4)  # T=2, k=3, 2x2 patches
    save_attention(grey_frames(2, 28), attention, tmp_path / "k3", scale=1)
    assert Image.open(tmp_path / "k3.png").size == (2 * 28, 3 * 28)


def test_stacked_strips_keep_each_read_under_its_label(tmp_path):
    attention = torch.zeros(2, 1, 1 + 4)
    attention[:, 0, 1], attention[:, 0, 4] = 1.0, 0.0  # every frame looks at the top-left patch
    save_attention(grey_frames(2, 28), attention, tmp_path / "a", scale=1)
    save_attention(grey_frames(2, 28), torch.rand(2, 3, 1 + 4), tmp_path / "b", scale=1)
    sheet = Image.open(stack_strips({"loop": tmp_path / "a.png", "static": tmp_path / "b.png"}, tmp_path / "s", 40))
    assert sheet.size == (40 + 2 * 28, 28 + 3 * 28)
    pixels = np.asarray(sheet)
    assert np.array_equal(pixels[:28, 40:], np.asarray(Image.open(tmp_path / "a.png")))
    assert np.array_equal(pixels[28:, 40:], np.asarray(Image.open(tmp_path / "b.png")))
    assert (pixels[:, :40] < 128).any(axis=-1).sum() > 10  # the labels are drawn


def test_entropy_of_uniform_and_peaked_maps():
    uniform = patch_maps(torch.full((1, 1, 1 + 16), 1 / 17), (4, 4))
    assert torch.allclose(uniform.sum((-1, -2)), torch.ones(1, 1))
    assert math.isclose(entropy(uniform).item(), math.log(16), rel_tol=1e-5)
    peaked = torch.zeros(1, 1, 17)
    peaked[..., 5] = 1
    assert entropy(patch_maps(peaked, (4, 4))).item() == 0


def test_read_attention_gives_one_distribution_per_frame_and_glimpse():
    model = tiny_model(glimpses=2)
    clip = frames(1, 3)[0]  # (T, 3, 16, 16): a 4x4 grid of 4-px patches
    ids = torch.tensor([5, 6, 7])
    for mode in ("coarse_only", "coarse_fine", "autoregressive"):
        attention = read_attention(model, clip, ids, mode)
        assert attention.shape == (3, 2, 1 + 16)
        assert torch.allclose(attention.sum(-1), torch.ones(3, 2), atol=1e-5)
    fine = read_attention(model, clip, ids, "autoregressive")
    assert not torch.allclose(fine, read_attention(model, clip, ids, "coarse_only"))  # the queries moved


def test_clips_read_together_look_where_each_looks_alone():
    model = tiny_model(glimpses=2)
    clips = [frames(1, 3, seed=1)[0], frames(1, 2, seed=2)[0], frames(1, 4, seed=3)[0]]  # padded to 4 frames
    ids = torch.tensor([5, 6, 7])
    for mode in ("coarse_only", "coarse_fine", "autoregressive"):
        together = read_attentions(model, clips, ids, mode)
        for clip, attention in zip(clips, together, strict=True):
            assert attention.shape == (len(clip), 2, 1 + 16)
            assert torch.allclose(attention, read_attention(model, clip, ids, mode), atol=1e-5)


def test_beside_keeps_the_frame_as_it_is_and_draws_each_map_over_its_grey():
    """A red ball on grey, 16:9: the frame panel is the frame, byte for byte (the ball stays red); each map's panel
    has no colour from the frame, only the map's, brightest over the attended patch."""
    h, w = 36, 64
    frame = np.full((h, w, 3), 110, dtype=np.uint8)
    frame[4:12, 40:48] = (225, 30, 30)  # the ball
    maps = torch.full((2, 3, 4), 0.01)
    maps[0, 0, 2] = 1.0  # the first map on the ball's patch (rows of 12 px, columns of 16 px)
    maps[1, 2, 0] = 1.0  # the second elsewhere
    picture = beside(frame, maps, gap=4)
    assert picture.shape == (h, 3 * w + 2 * 4, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[:, :w], frame)
    assert (picture[:, w : w + 4] == 255).all()  # the gap
    panels = [picture[:, w + 4 : 2 * w + 4], picture[:, 2 * w + 8 :]]
    for panel, (row, col) in zip(panels, [(0, 2), (2, 0)], strict=True):
        luminance = panel.astype(float).sum(-1)
        peak = np.unravel_index(luminance.argmax(), luminance.shape)
        assert (peak[0] // 12, peak[1] // 16) == (row, col)
    # where a map is cold, the panel is the frame's grey darkened: the red ball is not red there
    cold = panels[1][4:12, 40:48].astype(int)
    assert (abs(cold[..., 0] - cold[..., 1]) < 60).all()
    assert grey(frame)[5, 41].tolist() == [round(0.299 * 225 + 0.587 * 30 + 0.114 * 30)] * 3
