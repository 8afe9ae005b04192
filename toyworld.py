"""A synthetic video world, generated offline from a seed, where looking in the right place answers the question.

Each clip has T frames on a grey, cluttered background (grey shapes of random size). Frame 0 is the cue:
a large disc of one of four colours (red, green, blue, yellow) in the middle of the frame. Frames
1..T-1 hold four boxes, one per quadrant, drifting a little, among fresh clutter: each box is a square
of one of the four cue colours with a disc of another palette (white, black, purple, orange) inside. The
question asks what colour is inside the box that has the cue's colour; the options are the four inside
colours (chance 25 %). Of the four boxes 1 to 4 are coloured, the cue's among them, the rest grey (see
`sample`). A whole-frame token of frames 1.. holds all the colours and cannot say which inside goes with
which box; a query written after seeing the cue can look for patches of the cue's colour, and those
patches carry the inside colour too. Colour both selects and answers because it is what DINOv2's features
hold most plainly: with one coloured box, a linear probe reads the inside colour from a single read token
of frame 1 at 97 % (random query) and from pooled features at 98 %; with four, at chance (19-25 %). What
the four-box clips add is where to look: what coarse_only cannot do and coarse_fine / autoregressive can.

Written as WebDataset shards in the project's training format (data.py), one folder per family:
  caption/NNNNNN.tar  stage 1: `caption` describing the clip
  qa/NNNNNN.tar       stage 2: `user` (the multiple-choice prompt) / `assistant` ("C. purple")
  dpo/NNNNNN.tar      stage 3: `user` / `chosen` (the right option) / `rejected` (a wrong one)
  val/NNNNNN.tar      held-out clips as stage-2 samples, for validation loss
  eval/NNNNNN.tar     the same held-out clips as multiple-choice questions in benchmarks.py's schema
                      (`question`, `options`, `answer`): `python benchmark.py --bench toy --data-root DIR/eval`
Every JSON also carries `scene`, the clip's full description, from which it is rendered and from which
the answer can be recomputed (`answer_of`). Same seed and sizes, same bytes; `ensure` regenerates only
when the manifest (toyworld.json) records other settings or another version of the generator (`WORLD`,
bumped whenever the clips or questions change, so that old shards are rewritten rather than trained on).

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

COLOURS: dict[str, tuple[int, int, int]] = {  # the cue's and the boxes' colours
    "red": (225, 30, 30),
    "green": (30, 175, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 30),
}
INSIDES: dict[str, tuple[int, int, int]] = {  # what a box holds: the answers, in option order
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "purple": (135, 45, 190),
    "orange": (250, 140, 20),
}
GREY, GREY_RGB = "grey", (165, 165, 165)  # a box that is no answer (training clips with fewer colours)
SHAPES = ("circle", "square", "triangle", "diamond")  # of the grey clutter
CORNERS = ("top left", "top right", "bottom left", "bottom right")
QUESTION = "What colour is inside the box that has the colour of the first frame?"
SPLITS = {"train": 0, "eval": 1}  # independent random streams: no eval clip is a training clip
SHARD_SIZE = 500
TASK = "{n} of 4 boxes coloured"  # the evaluation's group: a glance is right 1/n of the time
MANIFEST = "toyworld.json"
WORLD = 1  # the generator's version, kept in the manifest: bump it when the clips or questions change
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
    """The description of one clip (plain JSON types): the cue disc, one box per corner with its path, clutter.

    `coloured` boxes (the one with the cue's colour included) take distinct colours and distinct insides;
    the others are grey throughout.
    """
    r = size // 6  # a box's half-width: about three 14-px patches across at 112 px
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    insides = [str(c) for c in rng.permutation(list(INSIDES))]
    cue = colours[int(rng.integers(4))]
    target = colours.index(cue)
    for corner in rng.choice([c for c in range(4) if c != target], 4 - coloured, replace=False):
        colours[corner] = insides[corner] = GREY
    objects = []
    for corner in range(4):
        x0, y0, x1, y1 = _corner_box(corner, size, r + 1)
        start = rng.uniform([x0, y0], [x1, y1])
        step = rng.uniform(-r / 3, r / 3, 2)
        path = [np.clip(start + t * step, [x0, y0], [x1, y1]).round().astype(int).tolist() for t in range(frames - 1)]
        objects.append({"corner": corner, "colour": colours[corner], "inside": insides[corner], "path": path})
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
        "inner_radius": round(0.7 * r),
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
                _shape(draw, "square", o["path"][t - 1], r, COLOURS.get(o["colour"], GREY_RGB))
                _shape(draw, "circle", o["path"][t - 1], scene["inner_radius"], INSIDES.get(o["inside"], GREY_RGB))
        images.append(im)
    return images


def target_of(scene: dict[str, Any]) -> dict[str, Any]:
    """The box with the cue's colour: the one the question is about."""
    return next(o for o in scene["objects"] if o["colour"] == scene["cue"]["colour"])


def answer_of(scene: dict[str, Any]) -> str:
    """The inside colour of the box with the cue's colour: what every question about the scene asks."""
    return target_of(scene)["inside"]


def box_patches(scene: dict[str, Any], t: int, patch: int) -> np.ndarray:
    """(P,) bool, row-major: which patches of frame t (>= 1) the box of the cue's colour overlaps."""
    (x, y), r = target_of(scene)["path"][t - 1], scene["radius"]
    starts = np.arange(scene["size"] // patch) * patch
    cols, rows = (starts <= x + r) & (starts + patch > x - r), (starts <= y + r) & (starts + patch > y - r)
    return (rows[:, None] & cols[None]).ravel()


def look_share(attention: torch.Tensor, scene: dict[str, Any], patch: int) -> float:
    """The share of the final read's attention (T, k, 1+P) that falls on the cue's box, over frames 1.. and
    glimpses: how well the queries look where the answer is."""
    shares = [
        attention[t, :, 1:][:, torch.from_numpy(box_patches(scene, t, patch))].sum(-1).mean().item()
        for t in range(1, scene["frames"])
    ]
    return float(np.mean(shares))


def mcq_prompt(question: str, options: list[str]) -> str:
    """The multiple-choice user turn exactly as benchmarks.py builds it, so training matches evaluation."""
    return question + "\n" + options_block(options).rstrip("\n") + LETTER_PROMPT


def caption(scene: dict[str, Any]) -> str:
    parts = [
        f"a grey box at the {CORNERS[o['corner']]}"
        if o["colour"] == GREY
        else f"a {o['colour']} box with {o['inside']} inside at the {CORNERS[o['corner']]}"
        for o in scene["objects"]
    ]
    return f"A {scene['cue']['colour']} disc. Then " + ", ".join(parts) + "."


def sample(seed: int, split: str, index: int, size: int = 112, frames: int = 4) -> dict[str, Any]:
    """One clip's scene, rendered frames and question (`answer`: the right option's index, `wrong`: another).

    A clip shows 1 to 4 coloured boxes (the cue's box always among them, the rest grey): with one, any look
    at the colourful thing answers, which teaches reading what is inside a box; with more, only a look at
    the box of the cue's colour does, and a glance that sees n boxes is right 1/n of the time. Training
    clips draw n uniformly; held-out clip i has n = 1 + i % 4, so every n is a quarter of the evaluation.
    """
    rng = _rng(seed, split, index)
    coloured = 1 + index % 4 if split == "eval" else int(rng.integers(1, 5))
    scene = make_scene(rng, size, frames, coloured=coloured)
    options = list(INSIDES)
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
    task = TASK.format(n=sum(o["colour"] != GREY for o in scene["objects"]))
    user = mcq_prompt(QUESTION, options)
    reply = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    qa = {"user": user, "assistant": reply[answer], "scene": scene}
    metas = {
        "caption": {"caption": caption(scene), "scene": scene},
        "qa": qa,
        "val": qa,
        "dpo": {"user": user, "chosen": reply[answer], "rejected": reply[s["wrong"]], "scene": scene},
        "eval": {"question": QUESTION, "options": options, "answer": LETTERS[answer], "task": task, "scene": scene},
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


def _manifest(seed: int, train: int, eval: int, size: int, frames: int) -> dict[str, int]:
    """What toyworld.json records: the generator's version and the settings the shards were written with."""
    return {"world": WORLD, "seed": seed, "train": train, "eval": eval, "size": size, "frames": frames}


def generate(
    out: str | Path, seed: int = 0, train: int = TRAIN_CLIPS, eval: int = EVAL_CLIPS, size: int = 112, frames: int = 4
) -> Path:
    """Write every shard family into `out` (see the module docstring), then the manifest."""
    out = Path(out)
    _write(out, "train", ("caption", "qa", "dpo"), train, seed, size, frames)
    _write(out, "eval", ("val", "eval"), eval, seed, size, frames)
    (out / MANIFEST).write_text(json.dumps(_manifest(seed, train, eval, size, frames), indent=1))
    return out


def ensure(
    out: str | Path, seed: int = 0, train: int = TRAIN_CLIPS, eval: int = EVAL_CLIPS, size: int = 112, frames: int = 4
) -> Path:
    """`generate(out, ...)` unless `out` already holds exactly that world (its manifest says so)."""
    out = Path(out)
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == _manifest(seed, train, eval, size, frames):
        return out
    print(f"toyworld: writing {train} training and {eval} held-out clips to {out}", flush=True)
    return generate(out, seed=seed, train=train, eval=eval, size=size, frames=frames)


def look_and_draw(adapter: Any, bench: Any, out: Path, seed: int, frames: int, pictures: int) -> dict[str, float]:
    """Where the queries look, apart from whether the answer is read: the mean share of attention on the cue's
    box over the held-out four-box clips, for the static query (coarse_only), the queries written by the LLM
    (autoregressive) and a uniform look (also written to out/look.json); and attention pictures of the first
    `pictures` clips in both modes."""
    from attention_viz import read_attention, save_attention
    from tokenization import prompt_ids

    model, modes = adapter.model, ("coarse_only", "autoregressive")
    patch, look, uniform = model.encoder.dino.config.patch_size, {m: [] for m in modes}, []
    for i, q in enumerate(bench.questions):
        scene = sample(seed, "eval", int(q.id.removeprefix("eval")), adapter.size, frames)["scene"]
        four = all(o["colour"] != GREY for o in scene["objects"])
        if not four and i >= pictures:
            continue
        clip = adapter.prepare(q.media)[0][0]  # (T, 3, H, W)
        ids = torch.tensor(prompt_ids(model.tokenizer, q.prompt))
        if four:
            uniform.append(np.mean([box_patches(scene, t, patch).mean() for t in range(1, scene["frames"])]))
        for mode in modes:
            attention = read_attention(model, clip, ids, mode)
            if i < pictures:
                save_attention(clip, attention, out / "attention" / f"{q.id}_{mode}")
            if four:
                look[mode].append(look_share(attention, scene, patch))
    looks = {"uniform": float(np.mean(uniform)), **{m: float(np.mean(v)) for m, v in look.items()}}
    (out / "look.json").write_text(json.dumps({"clips": len(uniform), "share_on_cue_box": looks}, indent=1))
    return looks


def run(config: str | Path = DEFAULT_CONFIG, overrides: list[str] = (), clips: int = TRAIN_CLIPS, pictures: int = 4):
    """The toy run: write the world if missing, train, evaluate the held-out split in every mode, draw attention.

    The shards live where the config's `data.train_shards` points (ROOT/qa/*.tar); the clips are drawn
    at the config's frame size and frame count. Returns the evaluation summary (benchmark.py's).
    """
    import shutil

    import benchmark
    import train
    from adapters import FoveatedAdapter
    from config import load_config
    from model import MODES, FoveatedVLM

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
    print("  by boxes coloured (a glance that sees n is right 1/n of the time):")
    for task, row in summary["groups"]["task"].items():
        print(f"    {task:<22} n={row['n']:<4}" + "".join(f"{m} {row[m]:5.1f}  " for m in MODES))
    looks = look_and_draw(adapter, bench, out, cfg.train.seed, cfg.data.max_frames, pictures)
    print(f"attention on the cue's box, four-box clips (a uniform look: {100 * looks['uniform']:.0f} %):")
    print("  " + "  ".join(f"{m} {100 * v:.0f} %" for m, v in looks.items() if m != "uniform"))
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
