"""A synthetic video world, generated offline from a seed, where looking in the right place answers the question.

Each clip has T frames on a grey, noisy background strewn with grey clutter (shapes of random size, fresh in
every frame) and one small coloured ball (red, green, blue or yellow, 2x2 patches across at 112 px) that
drifts in a straight line from a random place, stopping at the border. The question asks the ball's colour;
the options are the four colours (chance 25 %). The ball is a few percent of each frame, so a read that
spreads its attention over the frame carries its colour faintly and one that finds it carries it plainly:
what a query learns here is to go where the ball is, and the attention pictures show whether it follows.

The cued task (`--task cued`) is the world where a glance should not carry the answer: frame 0 shows a white
shape (the cue) and no colour; the later frames show four coloured shapes, each shape once and each colour
once, drifting from random places; the question asks the colour of the one shaped like the cue. A static
query sees four colours in every later frame; a query written from what frame 0 showed can go to one shape.
The marked task (`--task marked`) asks where rather than what: frame 0 shows a white ball at a random place and
nothing else, the later frames four coloured balls (each colour once) standing still, one of them where the white
one was, and the question asks that one's colour. What frame 0 tells is a place, which a query reaches through
DINOv2's position embeddings, rather than a shape to match.
The binding task (`--task binding`) is the world where the question decides where to look: every frame shows four
coloured shapes (each colour once, each shape once) at random places, and the question names one by one attribute
and asks the other ("What colour is the triangle?", "What shape is the red one?"). The bag of colours and shapes is
the same in every clip: only a read that goes to the named object carries which colour belongs to which shape.
A curriculum (`generate(..., objects=(1, 4))`, `--objects 1-4`) lets training clips hold fewer of the objects; the
held-out clips always hold four.

Written as WebDataset shards in the project's training format (data.py), one folder per family:
  caption/NNNNNN.tar  stage 1: `caption` describing the clip ("A red ball moves from the top left to ...")
  qa/NNNNNN.tar       stage 2: `user` (the multiple-choice prompt) / `assistant` ("C. blue")
  ask/NNNNNN.tar      stage 2: the same question asked plainly ("What colour is the ball?" / "The ball is blue."):
                      a trained model answers a person as well as a benchmark, and the short wording costs
                      less than half the tokens of the lettered one
  dpo/NNNNNN.tar      stage 3: `user` / `chosen` (the right option) / `rejected` (a wrong one)
  val/, ask_val/      held-out clips as stage-2 samples in either wording, for validation loss
  eval/NNNNNN.tar     the same held-out clips as multiple-choice questions in eval_sets.py's schema
                      (`question`, `options`, `answer`, `task`: whether the ball keeps near the centre):
                      `python benchmark.py --model runs/toy/final --bench toy --data-root DIR/eval`
  caption_eval/       the held-out clips with their captions, for `benchmark.py --bench captions`
  ask_eval/           the same held-out questions asked plainly (`format: plain`: each option a whole reply,
                      "The ball is red.", ...), what the toy run trains on and evaluates
Every JSON also carries `scene`, the clip's full description, from which it is rendered and from which
the answer can be recomputed (`answer_of`). Same seed and sizes, same bytes; `ensure` regenerates only
when the manifest (toyworld.json) records other settings or another version of the generator (`WORLD`,
bumped whenever the clips or questions change, so that old shards are rewritten rather than trained on).

    python toyworld.py run                                   # generate if missing, train, evaluate, draw
    python toyworld.py generate --out data/toy --seed 0     # the shards only (this module's `generate`)
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from layouts.eval_sets import LETTER_PROMPT, LETTERS, options_block

COLOURS: dict[str, tuple[int, int, int]] = {  # the ball's colours: the answers, in option order
    "red": (225, 30, 30),
    "green": (30, 175, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")  # of the grey clutter
CORNERS = ("top left", "top right", "bottom left", "bottom right")
QUESTION = "What colour is the ball?"
CUED_QUESTION = "What colour is the shape the first frame shows?"
MARKED_QUESTION = "What colour is the ball where the first frame shows a white one?"
SPLITS = {"train": 0, "eval": 1}  # independent random streams: no eval clip is a training clip
SHARD_SIZE = 500
GROUPS = ("ball near the centre", "ball off-centre")  # the evaluation's `task`: off-centre is the harder look
LOOK_CLIPS = 25  # held-out clips whose attention is measured (two more forward passes each)
MANIFEST = "toyworld.json"
WORLD = 5  # the generator's version, kept in the manifest: bump it when the clips or questions change
TRAIN_CLIPS, EVAL_CLIPS = 2000, 100
ALL = (4, 4)  # the binding task's objects a clip, fewest and most: every one (a held-out clip always)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def make_scene(rng: np.random.Generator, size: int = 112, frames: int = 4, clutter: int = 6) -> dict[str, Any]:
    """The description of one clip (plain JSON types): the ball's colour and path, the clutter of each frame."""
    r = size // 8  # the ball's radius: two 14-px patches across at 112 px
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    step = rng.uniform(-size / 8, size / 8, 2)  # pixels a frame
    start = rng.uniform(r + 1, size - r - 1, 2)
    path = [np.clip(start + t * step, r + 1, size - r - 1).round().astype(int).tolist() for t in range(frames)]
    grey_r = size // 6  # the clutter's largest radius
    grey = [
        [
            {
                "xy": rng.integers(0, size, 2).tolist(),
                "r": int(rng.integers(grey_r // 2, grey_r + 1)),
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
        "ball": {"colour": colour, "radius": r, "path": path},
        "clutter": grey,
        "noise_seed": int(rng.integers(2**31)),
    }


def make_cued_scene(rng: np.random.Generator, size: int = 112, frames: int = 4, clutter: int = 6) -> dict[str, Any]:
    """A clip of the cued task: frame 0 shows a white shape (the cue) in the middle of the clutter; the later frames
    show four coloured shapes (each shape once, each colour once) drifting from random places, and the answer is
    the colour of the one shaped like the cue. A glance sees four colours in every later frame and which of them
    is the answer only in how they bind to shapes; a query written from the cue can go to the one shape."""
    scene = make_scene(rng, size, frames, clutter)
    r = scene["ball"]["radius"]
    objects = _objects(rng, size, frames, r, size / 16)
    target = int(rng.integers(len(objects)))
    scene["cue"] = {"shape": objects[target]["shape"], "xy": [size // 2, size // 2], "radius": int(1.5 * r)}
    scene["objects"], scene["target"] = objects, target
    # the target stands in for the ball (answer, group, look share); frame 0 holds only the cue
    scene["ball"] = {**objects[target], "path": [scene["cue"]["xy"], *objects[target]["path"][1:]]}
    scene["task"] = "cued"
    return scene


def make_marked_scene(rng: np.random.Generator, size: int = 112, frames: int = 4, clutter: int = 6) -> dict[str, Any]:
    """A clip of the marked task: frame 0 shows a white ball (the cue) at a random place and nothing else but the
    noisy background, so that any read of it carries the place; the later frames four coloured balls standing
    still among the clutter (each colour once, apart), one of them where the cue was, and the answer is that
    one's colour. The places change from clip to clip and every colour is in every later frame, so a glance
    cannot tell which is meant; a query written from frame 0 can go to the place."""
    scene = make_scene(rng, size, frames, clutter)
    scene["clutter"][0] = []
    r = scene["ball"]["radius"]
    colours, starts = rng.permutation(len(COLOURS)).tolist(), []
    while len(starts) < len(COLOURS):  # apart by more than a diameter: no ball covers another
        xy = rng.uniform(r + 1, size - r - 1, 2).round().astype(int)
        if all(np.linalg.norm(xy - o) > 2.5 * r for o in starts):
            starts.append(xy)
    objects = [
        {"shape": "circle", "colour": list(COLOURS)[c], "radius": r, "path": [xy.tolist()] * frames}
        for c, xy in zip(colours, starts, strict=True)
    ]
    target = int(rng.integers(len(objects)))
    scene["cue"] = {"shape": "circle", "xy": objects[target]["path"][0], "radius": r}
    scene["objects"], scene["target"] = objects, target
    scene["ball"] = objects[target]  # the target stands in for the ball (answer, group, look share)
    scene["task"] = "marked"
    return scene


def _objects(
    rng: np.random.Generator, size: int, frames: int, r: int, step: float, count: int = len(SHAPES)
) -> list[dict[str, Any]]:
    """`count` coloured shapes (four: every one), each shape at most once and each colour at most once, started
    apart at random places and drifting by up to `step` pixels a frame (the cued task's later frames, the binding
    task's every frame)."""
    shapes, colours = rng.permutation(len(SHAPES)).tolist(), rng.permutation(len(COLOURS)).tolist()
    shapes, colours = shapes[:count], colours[:count]
    starts: list[np.ndarray] = []
    while len(starts) < count:  # starts apart by more than a diameter: no shape covers another at first
        xy = rng.uniform(r + 1, size - r - 1, 2)
        starts = [*starts, xy] if all(np.linalg.norm(xy - o) > 2.5 * r for o in starts) else starts[:-1]
    objects = []
    for shape, colour, start in zip(shapes, colours, starts, strict=True):
        move = rng.uniform(-step, step, 2)
        path = [np.clip(start + t * move, r + 1, size - r - 1).round().astype(int).tolist() for t in range(frames)]
        objects.append({"shape": SHAPES[shape], "colour": list(COLOURS)[colour], "radius": r, "path": path})
    return objects


def make_binding_scene(
    rng: np.random.Generator, size: int = 112, frames: int = 4, clutter: int = 6, objects: tuple[int, int] = ALL
) -> dict[str, Any]:
    """A clip of the binding task: every frame shows four coloured shapes (each colour once, each shape once) at
    random places, drifting, among the grey clutter; the question names one of them by one attribute and asks the
    other ("What colour is the triangle?", "What shape is the red one?"). Every clip holds the same bag of colours
    and of shapes, so a read that does not know the question carries no answer but in which colour binds to which
    shape; a read written from the question can go to the one it names.
    `objects` (fewest, most), other than (4, 4): the clip holds that many of them, each count alike likely (a
    curriculum for the training split, `generate(..., objects=)`): clips of one object teach the readout to name a
    colour or a shape from any read; clips of two and three reward a read for going to the named one; only four
    hide the answer from every read that does not."""
    scene = make_scene(rng, size, frames, clutter)
    r = scene["ball"]["radius"]
    # drawn only for a curriculum: the world of four objects in every clip keeps its clips
    count = int(rng.integers(objects[0], objects[1] + 1)) if objects != ALL else len(SHAPES)
    while True:  # apart in every frame, so that none is ever hidden behind another
        shown = _objects(rng, size, frames, r, size / 16, count)
        paths = np.asarray([o["path"] for o in shown], dtype=float)  # (count, T, 2)
        gaps = np.linalg.norm(paths[:, None] - paths[None], axis=-1)[~np.eye(len(shown), dtype=bool)]
        if gaps.size == 0 or gaps.min() > 2.2 * r:  # one object: no pair to keep apart
            break
    target, ask = int(rng.integers(len(shown))), ("colour", "shape")[int(rng.integers(2))]
    scene["objects"], scene["target"], scene["ask"] = shown, target, ask
    scene["ball"] = shown[target]  # the named object stands in for the ball (answer, group, look share)
    scene["task"] = "binding"
    return scene


# the world's tasks: the ball's colour, the colour of the shape the first frame shows, of the ball where it shows
# one, and one attribute of the object the question names by the other
SCENES = {"ball": make_scene, "cued": make_cued_scene, "marked": make_marked_scene, "binding": make_binding_scene}
TASKS = tuple(SCENES)
QUESTIONS = {"ball": QUESTION, "cued": CUED_QUESTION, "marked": MARKED_QUESTION}  # binding: one per clip
TARGETS = {  # what the look share measures (ball_patches), per task
    "ball": "the ball",
    "cued": "the cue, then the cued shape",
    "marked": "the white ball, then the one in its place",
    "binding": "the object the question names",
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
    """The clip's frames as RGB images, a pure function of the scene: the ball is drawn over the clutter."""
    size, ball = scene["size"], scene["ball"]
    noise = np.random.default_rng(scene["noise_seed"])
    images = []
    for t in range(scene["frames"]):
        background = 110 + noise.integers(-6, 7, (size, size, 1)) + np.zeros((1, 1, 3), int)
        im = Image.fromarray(background.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for c in scene["clutter"][t]:
            _shape(draw, c["shape"], c["xy"], c["r"], (c["grey"],) * 3)
        if scene.get("task", "ball") == "ball":
            _shape(draw, "circle", ball["path"][t], ball["radius"], COLOURS[ball["colour"]])
        elif t == 0 and scene["task"] != "binding":  # the cue: white, outlined in black: no grey clutter is like it
            cue, r = scene["cue"], scene["cue"]["radius"]
            _shape(draw, cue["shape"], cue["xy"], r + 2, (0, 0, 0))
            _shape(draw, cue["shape"], cue["xy"], r, (255, 255, 255))
        else:
            for o in scene["objects"]:
                _shape(draw, o["shape"], o["path"][t], o["radius"], COLOURS[o["colour"]])
        images.append(im)
    return images


def answer_of(scene: dict[str, Any]) -> str:
    """The ball's colour (in the cued and marked tasks, the cued one's; in the binding task the named object's
    colour or shape, whichever is asked): what every question about the scene asks."""
    return scene["ball"][scene.get("ask", "colour")]


def options_of(scene: dict[str, Any]) -> list[str]:
    """The answers a question about the scene chooses from, in option order: the colours, or the shapes."""
    return list(SHAPES) if scene.get("ask", "colour") == "shape" else list(COLOURS)


def question_of(scene: dict[str, Any]) -> str:
    if scene.get("task", "ball") != "binding":
        return QUESTIONS[scene.get("task", "ball")]
    named = scene["ball"]
    if scene["ask"] == "colour":
        return f"What colour is the {named['shape']}?"
    return f"What shape is the {named['colour']} one?"


def other_questions(scene: dict[str, Any]) -> list[str]:
    """Two questions about a binding clip that name two different objects, each by a different attribute (the
    clip's own question first): a read written from the question should go to a different object for each."""
    named = scene["ball"]
    other = next(o for o in scene["objects"] if o is not named and o["colour"] != named["colour"])
    if scene["ask"] == "colour":
        return [question_of(scene), f"What shape is the {other['colour']} one?"]
    return [question_of(scene), f"What colour is the {other['shape']}?"]


def group_of(scene: dict[str, Any]) -> str:
    """Whether the ball keeps near the middle of the frame (mean distance under a quarter of its width); in the
    binding task, which attribute the question asks."""
    if scene.get("task", "ball") == "binding":
        return f"asks the {scene['ask']}"
    offsets = np.asarray(scene["ball"]["path"]) - scene["size"] / 2
    return GROUPS[int(np.linalg.norm(offsets, axis=1).mean() >= scene["size"] / 4)]


def ball_patches(scene: dict[str, Any], t: int, patch: int) -> np.ndarray:
    """(P,) bool, row-major: which patches of frame t the ball's bounding square overlaps (in the cued and marked
    tasks, the cue's, outline included, in frame 0 and the cued one's after; in the binding task, the named
    object's in every frame)."""
    (x, y), r = scene["ball"]["path"][t], scene["ball"]["radius"]
    if t == 0 and scene.get("task", "ball") in ("cued", "marked"):
        (x, y), r = scene["cue"]["xy"], scene["cue"]["radius"] + 2
    starts = np.arange(scene["size"] // patch) * patch
    cols, rows = (starts <= x + r) & (starts + patch > x - r), (starts <= y + r) & (starts + patch > y - r)
    return (rows[:, None] & cols[None]).ravel()


def look_share(attention: torch.Tensor, scene: dict[str, Any], patch: int) -> float:
    """The share of the final read's attention (T, k, 1+P) that falls on the ball, over frames and glimpses:
    how well the queries look where the answer is."""
    shares = [
        attention[t, :, 1:][:, torch.from_numpy(ball_patches(scene, t, patch))].sum(-1).mean().item()
        for t in range(scene["frames"])
    ]
    return float(np.mean(shares))


def mcq_prompt(question: str, options: list[str]) -> str:
    """The multiple-choice user turn exactly as eval_sets.py builds it, so training matches evaluation."""
    return question + "\n" + options_block(options).rstrip("\n") + LETTER_PROMPT


EVAL_OF = {"qa": "eval", "ask": "ask_eval"}  # the held-out questions in the wording a run trained on


def held_out(train_glob: str) -> Path:
    """The evaluation split for a run whose first training source is `train_glob` (ROOT/<family>/*.tar)."""
    family = Path(train_glob).parent
    return family.parent / EVAL_OF.get(family.name, "eval")


def plain_reply(answer: str, task: str = "ball") -> str:
    """The answer to the task's question asked plainly (a colour, or in the binding task a shape)."""
    if answer in SHAPES:
        return f"It is a {answer}."
    return f"It is {answer}." if task != "ball" else f"The ball is {answer}."


def _corner(scene: dict[str, Any], xy: list[int]) -> str:
    half = scene["size"] / 2
    return CORNERS[int(xy[0] >= half) + 2 * int(xy[1] >= half)]


def caption(scene: dict[str, Any]) -> str:
    if scene.get("task", "ball") == "marked":
        balls = ", ".join(f"a {o['colour']} ball at the {_corner(scene, o['path'][-1])}" for o in scene["objects"])
        return f"A white ball is shown at the {_corner(scene, scene['cue']['xy'])}, then {balls}, among grey shapes."
    if scene.get("task", "ball") in ("cued", "binding"):
        shapes = ", ".join(f"a {o['colour']} {o['shape']}" for o in scene["objects"])
        if scene["task"] == "binding":
            return f"{shapes[0].upper()}{shapes[1:]} move among grey shapes."
        return f"A white {scene['cue']['shape']} is shown, then {shapes} move among grey shapes."
    path, colour = scene["ball"]["path"], scene["ball"]["colour"]
    first, last = _corner(scene, path[0]), _corner(scene, path[-1])
    where = f"stays at the {first}" if first == last else f"moves from the {first} to the {last}"
    return f"A {colour} ball {where}, among grey shapes."


def sample(
    seed: int,
    split: str,
    index: int,
    size: int = 112,
    frames: int = 4,
    task: str = "ball",
    objects: tuple[int, int] = ALL,
) -> dict[str, Any]:
    """One clip's scene, rendered frames and question (`answer`: the right option's index, `wrong`: another).
    `objects`: the binding task's curriculum, training clips only; every held-out clip holds all four objects, so
    the held-out split is the same with or without it."""
    rng = _rng(seed, split, index)
    if task == "binding":
        scene = make_binding_scene(rng, size, frames, objects=objects if split == "train" else ALL)
    else:
        scene = SCENES[task](rng, size, frames)
    options = options_of(scene)
    answer = options.index(answer_of(scene))
    wrong = int(rng.choice([i for i in range(len(options)) if i != answer]))
    return {"scene": scene, "frames": render(scene), "options": options, "answer": answer, "wrong": wrong}


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def records(s: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """The tar members of one clip for each shard family: the same frames, a JSON per family."""
    media = {f"{t:03d}.jpg": _jpeg(im) for t, im in enumerate(s["frames"])}
    options, answer, scene = s["options"], s["answer"], s["scene"]
    question = question_of(scene)
    user = mcq_prompt(question, options)
    reply = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    qa = {"user": user, "assistant": reply[answer], "scene": scene}
    plain = [plain_reply(o, scene.get("task", "ball")) for o in options]
    ask = {"user": question, "assistant": plain[answer], "scene": scene}
    metas = {
        "ask": ask,
        "ask_val": ask,
        "ask_eval": {
            "question": question,
            "options": plain,
            "answer": LETTERS[answer],
            "format": "plain",
            "task": group_of(scene),
            "scene": scene,
        },
        "caption": {"caption": caption(scene), "scene": scene},
        "caption_eval": {"caption": caption(scene), "scene": scene},
        "qa": qa,
        "val": qa,
        "dpo": {"user": user, "chosen": reply[answer], "rejected": reply[s["wrong"]], "scene": scene},
        "eval": {
            "question": question,
            "options": options,
            "answer": LETTERS[answer],
            "task": group_of(scene),
            "scene": scene,
        },
    }
    return {name: {"__key__": key, "json": json.dumps(m).encode(), **media} for name, m in metas.items()}


def _write(
    out: Path,
    split: str,
    families: tuple[str, ...],
    n: int,
    seed: int,
    size: int,
    frames: int,
    task: str,
    objects: tuple[int, int],
) -> None:
    """Write clips 0..n-1 of `split` into out/<family>/NNNNNN.tar for each family (SHARD_SIZE clips a shard)."""
    for family in families:
        (out / family).mkdir(parents=True, exist_ok=True)
    for start in range(0, n, SHARD_SIZE):
        name = f"{start // SHARD_SIZE:06d}.tar"
        sinks = {f: wds.TarWriter(str(out / f / name), mtime=0.0) for f in families}  # mtime 0: same bytes
        for i in range(start, min(n, start + SHARD_SIZE)):
            recs = records(sample(seed, split, i, size, frames, task, objects), f"{split}{i:07d}")
            for family, sink in sinks.items():
                sink.write(recs[family])
        for sink in sinks.values():
            sink.close()


def _manifest(
    seed: int, train: int, eval: int, size: int, frames: int, task: str, objects: tuple[int, int]
) -> dict[str, Any]:
    """What toyworld.json records: the generator's version and the settings the shards were written with (the task
    only where it is not the ball, so that ball worlds written before the cued task existed stay valid; a binding
    curriculum only where there is one)."""
    settings = {"world": WORLD, "seed": seed, "train": train, "eval": eval, "size": size, "frames": frames}
    settings = settings if task == "ball" else {**settings, "task": task}
    return settings if objects == ALL else {**settings, "objects": list(objects)}


def generate(
    out: str | Path,
    seed: int = 0,
    train: int = TRAIN_CLIPS,
    eval: int = EVAL_CLIPS,
    size: int = 112,
    frames: int = 4,
    task: str = "ball",
    objects: tuple[int, int] = ALL,
) -> Path:
    """Write every shard family into `out` (see the module docstring), then the manifest. `objects`: how many
    objects the binding task's training clips hold, fewest and most (make_binding_scene)."""
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}: one of {TASKS}")
    objects = tuple(objects)
    if objects != ALL and (task != "binding" or not 1 <= objects[0] <= objects[1] <= len(SHAPES)):
        raise ValueError(f"objects={objects}: 1 <= fewest <= most <= 4 objects a clip, for the binding task only")
    out = Path(out)
    _write(out, "train", ("caption", "qa", "ask", "dpo"), train, seed, size, frames, task, objects)
    _write(out, "eval", ("val", "eval", "ask_val", "ask_eval", "caption_eval"), eval, seed, size, frames, task, objects)
    (out / MANIFEST).write_text(json.dumps(_manifest(seed, train, eval, size, frames, task, objects), indent=1))
    return out


def ensure(
    out: str | Path,
    seed: int = 0,
    train: int = TRAIN_CLIPS,
    eval: int = EVAL_CLIPS,
    size: int = 112,
    frames: int = 4,
    task: str = "ball",
    objects: tuple[int, int] = ALL,
) -> Path:
    """`generate(out, ...)` unless `out` already holds exactly that world (its manifest says so)."""
    out = Path(out)
    manifest, wanted = out / MANIFEST, _manifest(seed, train, eval, size, frames, task, tuple(objects))
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return out
    print(f"toyworld: writing {train} training and {eval} held-out clips ({task} task) to {out}", flush=True)
    return generate(out, seed=seed, train=train, eval=eval, size=size, frames=frames, task=task, objects=objects)
