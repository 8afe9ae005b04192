"""Where did the query look? Each frame with its query's attention over the patches drawn on top.

The model reports, for every frame and glimpse, the last DINO layer's attention of the query over
[CLS, patches], averaged over heads (`FVLMOutput.attention`, (B, T, k, 1+P)). Here the CLS weight is
dropped, the patch weights are renormalised and laid out on the patch grid, upsampled to the frame and
blended over it with a colour map whose brightness rises with the weight (so the brightest spot of a
picture is where the query looked). The entropy of each frame's patch distribution says how focused
the look was: log(P) nats is uniform, 0 is a single patch. Where a person asks about colours (the demo), `beside`
puts the frame untouched next to its maps, each drawn over the frame's grey: the blend would tint the very object
asked about.

    >>> from evals.attention_viz import read_attention, save_attention
    >>> attention = read_attention(model, frames, input_ids, mode="autoregressive")  # (T, k, 1+P)
    >>> save_attention(frames, attention, "runs/toy/attention/clip0")  # clip0.png, clip0.gif, clip0.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from inputs.frames import IMAGENET_MEAN, IMAGENET_STD

# An inferno-like map: black -> purple -> red -> orange -> pale yellow, luminance increasing throughout.
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
_LUT = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _ANCHORS[:, c]) for c in range(3)], -1)


def to_uint8(frames: Tensor) -> np.ndarray:
    """ImageNet-normalised frames (T, 3, H, W) -> RGB (T, H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (frames.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(0, 2, 3, 1).numpy()


def patch_maps(attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """(T, k, 1+P) attention over [CLS, patches] -> (T, k, gh, gw) over the patches, each map summing to 1."""
    patches = attention.detach().float().cpu()[..., 1:]
    if patches.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[-1]} patches do not fill a {grid[0]}x{grid[1]} grid")
    patches = patches / patches.sum(-1, keepdim=True).clamp(min=1e-12)
    return patches.view(*patches.shape[:-1], *grid)


def entropy(maps: Tensor) -> Tensor:
    """(..., gh, gw) distributions -> (...) entropy in nats."""
    p = maps.flatten(-2)
    return -(p * p.clamp(min=1e-12).log()).sum(-1)


def overlay(frame: np.ndarray, amap: Tensor, alpha: float = 0.6) -> np.ndarray:
    """One RGB frame (H, W, 3) uint8 and its (gh, gw) map -> the blended picture (H, W, 3) uint8.

    The map is scaled to its own maximum, so each frame shows where its peak is; the entropy (not the
    colour) says how peaked it is. Bilinear upsampling keeps each patch's weight centred on that patch.
    """
    h, w = frame.shape[:2]
    heat = F.interpolate(amap[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    level = (heat / heat.max().clamp(min=1e-12) * 255).round().clamp(0, 255).byte().numpy()
    return ((1 - alpha) * frame + alpha * _LUT[level]).round().astype(np.uint8)


def grey(frame: np.ndarray) -> np.ndarray:
    """An RGB frame (H, W, 3) uint8 -> its luminance (ITU-R 601), still 3 channels: the frame's layout without
    its colours, for a map to be drawn over."""
    y = frame[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(y.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def beside(frame: np.ndarray, maps: Tensor, gap: int = 4) -> np.ndarray:
    """One RGB frame (H, W, 3) uint8 and its k maps (k, gh, gw) -> [frame | map 1 | ... | map k], `gap` white
    pixels apart, (H, (k+1) W + k gap, 3) uint8.

    The frame is shown exactly as it is, so the object asked about keeps its colour (an overlay would tint a red
    ball orange and a blue one purple); each map is drawn over the frame's grey, so where it peaks can be found
    in the frame beside it, and none of the map's colours can be taken for the frame's."""
    h = frame.shape[0]
    background = grey(frame)
    space = np.full((h, gap, 3), 255, dtype=np.uint8)
    panels = [frame[..., :3]]
    for m in maps:
        panels += [space, overlay(background, m)]
    return np.concatenate(panels, axis=1)


def patch_grid(frames: Tensor, patch: int) -> tuple[int, int]:
    """The patch grid DINO makes of frames (..., H, W): its patch embedding is a stride-`patch` convolution."""
    return frames.shape[-2] // patch, frames.shape[-1] // patch


def save_attention(
    frames: Tensor, attention: Tensor, out: str | Path, patch: int = 14, scale: int = 2, ms_per_frame: int = 600
) -> dict:
    """Draw one clip: frames (T, 3, H, W) normalised, attention (T, k, 1+P) -> `out`.png / .gif / .json.

    The PNG is a strip, one column per frame and one row per glimpse, each cell H*scale x W*scale; the GIF
    plays the first glimpse's row. The JSON (also returned) holds the entropy per frame and glimpse, the
    uniform distribution's entropy for comparison, and the patch each look peaked on.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    maps = patch_maps(attention, patch_grid(frames, patch))  # (T, k, gh, gw)
    pixels = to_uint8(frames)
    t, k = maps.shape[:2]
    h, w = pixels.shape[1] * scale, pixels.shape[2] * scale
    cells = [
        [Image.fromarray(overlay(pixels[i], maps[i, g])).resize((w, h), Image.NEAREST) for i in range(t)]
        for g in range(k)
    ]
    strip = Image.new("RGB", (t * w, k * h))
    for g, row in enumerate(cells):
        for i, cell in enumerate(row):
            strip.paste(cell, (i * w, g * h))
    strip.save(out.with_suffix(".png"))
    cells[0][0].save(out.with_suffix(".gif"), save_all=True, append_images=cells[0][1:], duration=ms_per_frame, loop=0)
    gw = maps.shape[-1]
    peaks = maps.flatten(-2).argmax(-1)  # (T, k)
    summary = {
        "entropy": entropy(maps).tolist(),  # [frame][glimpse], nats
        "uniform_entropy": float(np.log(maps.shape[-2] * gw)),
        "peak_patch": [[[int(p) // gw, int(p) % gw] for p in row] for row in peaks],  # [frame][glimpse] = [row, col]
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary


def stack_strips(strips: dict[str, str | Path], out: str | Path, label_width: int = 96) -> Path:
    """{label: strip PNG} -> one PNG of the strips one under another, each labelled on its left: several reads
    of the same clip, side by side in time, for a person to compare where each looked."""
    images = {label: Image.open(path).convert("RGB") for label, path in strips.items()}
    width = label_width + max(im.width for im in images.values())
    sheet = Image.new("RGB", (width, sum(im.height for im in images.values())), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for label, im in images.items():
        sheet.paste(im, (label_width, y))
        draw.text((6, y + im.height // 2), label, fill="black", anchor="lm")
        y += im.height
    out = Path(out).with_suffix(".png")
    sheet.save(out)
    return out


def read_attention(model, frames: Tensor, input_ids: Tensor, read: str = "autoregressive") -> Tensor | None:
    """The attention of `model` over one clip (T, 3, H, W) in the named read (a foveated mode) -> (T, k, 1+P),
    or None for a kind whose read has none.

    `input_ids` (L,) is the prompt: where the frames come before it, it cannot change where the queries look
    (causal attention), but the autoregressive loop runs the whole sequence; with the frames after the question
    (frames_at after_question) it decides where the question-guided reads look.
    """
    return read_attentions(model, [frames], input_ids, read)[0]


@torch.no_grad()
def read_attentions(
    model, clips: list[Tensor], input_ids: Tensor | list[Tensor], read: str = "autoregressive"
) -> list[Tensor | None]:
    """`read_attention` of several clips (T_i, 3, H, W) after the same prompt (L,) or each after its own (a list),
    read as one padded batch: each clip's (T_i, k, 1+P), what it gives alone."""
    device = next(model.parameters()).device
    frames = pad_sequence([c.to(device) for c in clips], batch_first=True)  # (B, T, 3, H, W)
    lengths = torch.tensor([len(c) for c in clips], device=device)
    frame_mask = torch.arange(frames.shape[1], device=device) < lengths[:, None]  # (B, T)
    prompts = [input_ids] * len(clips) if isinstance(input_ids, Tensor) else list(input_ids)
    ids = pad_sequence([p.to(device) for p in prompts], batch_first=True)  # (B, L), right-padded
    mask = pad_sequence([torch.ones_like(p, device=device) for p in prompts], batch_first=True)
    visual = model.prepare(frames, frame_mask)
    read_kw = model.reads[read]  # on a KV cache where the read advances on one: the loop's steps not rerun
    attention = model.prefix(visual, ids, mask, model.uses_cache(**read_kw), **read_kw).attention
    if attention is None:
        return [None] * len(clips)
    return [a[:n].cpu() for a, n in zip(attention, lengths.tolist(), strict=True)]
