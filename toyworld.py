"""A synthetic video world, generated offline from a seed, where looking in the right place answers the question.

Each clip has T frames on a grey, cluttered background (grey shapes of random size). Frame 0 is the cue:
a large disc of one of four colours in the middle of the frame. Frames 1..T-1 hold four shapes, one per
quadrant, drifting a little, among fresh clutter, coloured with the four colours in random order. The
question asks where the shape with the cue's colour is; the options are the four corners (chance 25 %).
The cue is a colour because a pooled token reads colour almost perfectly (a linear probe on DINOv2's
pooled features: 98-100 %), so one coarse glance at frame 0 is enough. The answer is a position because a
pooled token keeps position poorly (45-64 %): a whole-frame token of frames 1.. holds four colours at four
places and cannot say which colour is where. A query written after seeing the cue colour can look at the
shape of that colour, and a token pooled over that shape's own patches knows its quadrant (99 %). That is
what coarse_only cannot do and coarse_fine / autoregressive can.

Written as WebDataset shards in the project's training format (data.py), one folder per family:
  caption/NNNNNN.tar  stage 1: `caption` describing the clip
  qa/NNNNNN.tar       stage 2: `user` (the multiple-choice prompt) / `assistant` ("C. bottom left")
  dpo/NNNNNN.tar      stage 3: `user` / `chosen` (the right option) / `rejected` (a wrong one)
  val/NNNNNN.tar      held-out clips as stage-2 samples, for validation loss
  eval/NNNNNN.tar     the same held-out clips as multiple-choice questions in benchmarks.py's schema
                      (`question`, `options`, `answer`): `python benchmark.py --bench toy --data-root DIR/eval`
Every JSON also carries `scene`, the clip's full description, from which it is rendered and from which
the answer can be recomputed (`answer_of`). Same seed and sizes, same bytes; `ensure` regenerates only
when the manifest (toyworld.json) records other settings.

    python toyworld.py run                                   # generate if missing, train, evaluate, draw
    python toyworld.py generate --out data/toy --seed 0     # the shards only
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from benchmarks import LETTER_PROMPT, LETTERS, options_block

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 175, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 30),
}
GREY, GREY_RGB = "grey", (165, 165, 165)  # a shape that is no answer (training clips with fewer colours)
SHAPES = ("circle", "square", "triangle", "diamond")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
QUESTION = "Where is the shape that has the colour of the first frame?"
SPLITS = {"train": 0, "eval": 1}  # independent random streams: no eval clip is a training clip
SHARD_SIZE = 500
TASK = "colour cue"
MANIFEST = "toyworld.json"
TRAIN_CLIPS, EVAL_CLIPS = 2000, 100
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy.yaml"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def _corner_box(corner: int, size: int, margin: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the region where a shape's centre may lie in `corner` (row-major 2x2)."""
    half = size // 2
    x0, y0 = (corner % 2) * half + margin, (corner // 2) * half + margin
    return x0, y0, x0 + half - 2 * margin, y0 + half - 2 * margin


def make_scene(
    rng: np.random.Generator, size: int = 112, frames: int = 4, coloured: int = 4, clutter: int = 6
) -> dict[str, Any]:
    """The description of one clip (plain JSON types): the cue disc, one shape per corner with its path, clutter.

    `coloured` shapes (the one with the cue's colour included) take distinct colours; the others are grey.
    """
    r = size // 10  # shape radius: about two 14-px patches across at 112 px
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    cue = colours[int(rng.integers(4))]
    target = colours.index(cue)
    for corner in rng.choice([c for c in range(4) if c != target], 4 - coloured, replace=False):
        colours[corner] = GREY
    objects = []
    for corner, colour in enumerate(colours):
        x0, y0, x1, y1 = _corner_box(corner, size, r + 1)
        start = rng.uniform([x0, y0], [x1, y1])
        step = rng.uniform(-r / 3, r / 3, 2)
        path = [np.clip(start + t * step, [x0, y0], [x1, y1]).round().astype(int).tolist() for t in range(frames - 1)]
        objects.append({"corner": corner, "colour": colour, "shape": SHAPES[rng.integers(4)], "path": path})
    grey = [
        [
            {
                "xy": rng.integers(0, size, 2).tolist(),
                "r": int(rng.integers(r // 2, r + 1)),
                "grey": int(rng.integers(60, 200)),
                "shape": SHAPES[rng.integers(4)],
            }
            for _ in range(clutter)
        ]
        for _ in range(frames)
    ]
    return {
        "size": size,
        "frames": frames,
        "radius": r,
        "cue": {"colour": cue, "xy": [size // 2, size // 2], "radius": size // 4},
        "objects": objects,
        "clutter": grey,
        "noise_seed": int(rng.integers(2**31)),
    }


def _shape(draw: ImageDraw.ImageDraw, shape: str, xy: list[int], r: int, fill: tuple[int, ...]) -> None:
    x, y = xy
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def render(scene: dict[str, Any]) -> list[Image.Image]:
    """The clip's frames as RGB images, a pure function of the scene."""
    size, r = scene["size"], scene["radius"]
    noise = np.random.default_rng(scene["noise_seed"])
    images = []
    for t in range(scene["frames"]):
        background = 110 + noise.integers(-6, 7, (size, size, 1)) + np.zeros((1, 1, 3), int)
        im = Image.fromarray(background.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for c in scene["clutter"][t]:
            _shape(draw, c["shape"], c["xy"], c["r"], (c["grey"],) * 3)
        if t == 0:
            (x, y), cr = scene["cue"]["xy"], scene["cue"]["radius"]
            draw.ellipse((x - cr, y - cr, x + cr, y + cr), fill=COLOURS[scene["cue"]["colour"]])
        else:
            for o in scene["objects"]:
                _shape(draw, o["shape"], o["path"][t - 1], r, COLOURS.get(o["colour"], GREY_RGB))
        images.append(im)
    return images


def answer_of(scene: dict[str, Any]) -> str:
    """The corner of the shape with the cue's colour: what every question about the scene asks."""
    return next(CORNERS[o["corner"]] for o in scene["objects"] if o["colour"] == scene["cue"]["colour"])


def mcq_prompt(question: str, options: list[str]) -> str:
    """The multiple-choice user turn exactly as benchmarks.py builds it, so training matches evaluation."""
    return question + "\n" + options_block(options).rstrip("\n") + LETTER_PROMPT


def caption(scene: dict[str, Any]) -> str:
    parts = [f"a {o['colour']} {o['shape']} at the {CORNERS[o['corner']]}" for o in scene["objects"]]
    return f"A {scene['cue']['colour']} disc. Then " + ", ".join(parts) + "."


def sample(seed: int, split: str, index: int, size: int = 112, frames: int = 4) -> dict[str, Any]:
    """One clip's scene, rendered frames and question (`answer`: the right option's index, `wrong`: another).

    Held-out clips always show four colours. Training clips show 1 to 4, uniformly (the cue's colour always
    among them, the rest grey): with one, any look at the colourful thing answers, which teaches reading
    where a shape is; with more, only a look at the shape of the cue's colour does.
    """
    rng = _rng(seed, split, index)
    scene = make_scene(rng, size, frames, coloured=4 if split == "eval" else int(rng.integers(1, 5)))
    options = list(CORNERS)
    answer = options.index(answer_of(scene))
    wrong = int(rng.choice([i for i in range(4) if i != answer]))
    return {"scene": scene, "frames": render(scene), "options": options, "answer": answer, "wrong": wrong}


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def records(s: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """The tar members of one clip for each shard family: the same frames, a JSON per family."""
    media = {f"{t:03d}.jpg": _jpeg(im) for t, im in enumerate(s["frames"])}
    options, answer, scene = s["options"], s["answer"], s["scene"]
    user = mcq_prompt(QUESTION, options)
    reply = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    qa = {"user": user, "assistant": reply[answer], "scene": scene}
    metas = {
        "caption": {"caption": caption(scene), "scene": scene},
        "qa": qa,
        "val": qa,
        "dpo": {"user": user, "chosen": reply[answer], "rejected": reply[s["wrong"]], "scene": scene},
        "eval": {"question": QUESTION, "options": options, "answer": LETTERS[answer], "task": TASK, "scene": scene},
    }
    return {name: {"__key__": key, "json": json.dumps(m).encode(), **media} for name, m in metas.items()}


def _write(out: Path, split: str, families: tuple[str, ...], n: int, seed: int, size: int, frames: int) -> None:
    """Write clips 0..n-1 of `split` into out/<family>/NNNNNN.tar for each family (SHARD_SIZE clips a shard)."""
    for family in families:
        (out / family).mkdir(parents=True, exist_ok=True)
    for start in range(0, n, SHARD_SIZE):
        name = f"{start // SHARD_SIZE:06d}.tar"
        sinks = {f: wds.TarWriter(str(out / f / name), mtime=0.0) for f in families}  # mtime 0: same bytes
        for i in range(start, min(n, start + SHARD_SIZE)):
            recs = records(sample(seed, split, i, size, frames), f"{split}{i:07d}")
            for family, sink in sinks.items():
                sink.write(recs[family])
        for sink in sinks.values():
            sink.close()


def generate(
    out: str | Path, seed: int = 0, train: int = TRAIN_CLIPS, eval: int = EVAL_CLIPS, size: int = 112, frames: int = 4
) -> Path:
    """Write every shard family into `out` (see the module docstring), then the manifest."""
    out = Path(out)
    settings = {"seed": seed, "train": train, "eval": eval, "size": size, "frames": frames}
    _write(out, "train", ("caption", "qa", "dpo"), train, seed, size, frames)
    _write(out, "eval", ("val", "eval"), eval, seed, size, frames)
    (out / MANIFEST).write_text(json.dumps(settings, indent=1))
    return out


def ensure(
    out: str | Path, seed: int = 0, train: int = TRAIN_CLIPS, eval: int = EVAL_CLIPS, size: int = 112, frames: int = 4
) -> Path:
    """`generate(out, ...)` unless `out` already holds exactly that world (its manifest says so)."""
    out = Path(out)
    wanted = {"seed": seed, "train": train, "eval": eval, "size": size, "frames": frames}
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return out
    print(f"toyworld: writing {wanted['train']} training and {wanted['eval']} held-out clips to {out}", flush=True)
    return generate(out, **wanted)


def run(config: str | Path = DEFAULT_CONFIG, overrides: list[str] = (), clips: int = TRAIN_CLIPS, pictures: int = 4):
    """The toy run: write the world if missing, train, evaluate the held-out split in every mode, draw attention.

    The shards live where the config's `data.train_shards` points (ROOT/qa/*.tar); the clips are drawn
    at the config's frame size and frame count. Returns the evaluation summary (benchmark.py's).
    """
    import shutil

    import benchmark
    import train
    from adapters import FoveatedAdapter
    from attention_viz import read_attention, save_attention
    from config import load_config
    from model import MODES, FoveatedVLM
    from tokenization import prompt_ids

    start = time.perf_counter()
    cfg = load_config(config, list(overrides))
    root = Path(cfg.data.train_shards).parent.parent
    ensure(root, seed=cfg.train.seed, train=clips, size=cfg.data.frame_size, frames=cfg.data.max_frames)
    final = train.train(cfg)
    model = FoveatedVLM.from_pretrained(final)
    out = Path(cfg.train.out_dir)
    shutil.rmtree(out / "eval", ignore_errors=True)  # predictions of an earlier model must not be reused
    bench = benchmark.load_benchmark("toy", root / "eval")
    adapter = FoveatedAdapter(model, cfg.data.max_frames, size=cfg.data.frame_size)
    summary = benchmark.evaluate(adapter, bench, "likelihood", list(MODES), out / "eval")
    benchmark.print_summary(summary)
    for q in bench.questions[:pictures]:
        frames = adapter.prepare(q.media)[0][0]  # (T, 3, H, W)
        ids = torch.tensor(prompt_ids(model.tokenizer, q.prompt))
        for mode in ("coarse_only", "autoregressive"):
            save_attention(frames, read_attention(model, frames, ids, mode), out / "attention" / f"{q.id}_{mode}")
    print(f"model: {final} (FoveatedVLM.from_pretrained), attention pictures: {out / 'attention'}")
    print(f"toy run took {time.perf_counter() - start:.0f} s")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate if missing, train, evaluate every mode, draw attention")
    r.add_argument("--config", default=str(DEFAULT_CONFIG))
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.max_steps=10")
    r.add_argument("--clips", type=int, default=TRAIN_CLIPS, help="training clips to generate")
    g = sub.add_parser("generate", help="write the shards only")
    g.add_argument("--out", default="data/toy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train", type=int, default=TRAIN_CLIPS, help="training clips")
    g.add_argument("--eval", type=int, default=EVAL_CLIPS, help="held-out clips")
    g.add_argument("--size", type=int, default=112, help="frame size in pixels")
    g.add_argument("--frames", type=int, default=4)
    a = p.parse_args(argv)
    if a.command == "run":
        run(a.config, a.set, a.clips)
    else:
        generate(a.out, a.seed, a.train, a.eval, a.size, a.frames)


if __name__ == "__main__":
    main()
