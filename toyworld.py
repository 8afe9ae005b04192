"""The toy run, the main command (`python toyworld.py run`): a placed look against a glance, in minutes on a CPU.

It writes the toy world if it is missing (layouts/toy.py) and trains the foveated model with configs/toy.yaml and,
beside it step for step, the glance: the same model, steps, data and seed, trained to read in coarse_only mode
(the static query alone, no feedback), so that each of the two is a model trained for the way it reads. Taking
their steps in turn, they share each batch's frozen DINOv2 pass (train.train_together); each ends as it would
alone. It evaluates the
held-out split (likelihood protocol): the foveated model in every mode, the glance in its own. Then it
measures where each looked, apart from whether the answer was read: the share of the final read's attention
on the ball over LOOK_CLIPS held-out clips (against a uniform look), and draws the attention of a few clips
(each read's strip, and the reads of a clip one under another).
Everything lands under train.out_dir: final/ (the foveated model), glance/final/, eval/, attention/ and
summary.json (the accuracies, the look shares and the seconds of each part).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchmark
import cli
import registry
import train
from cli import UserError
from config import load_config
from evals.answering import Answerer
from evals.attention_viz import read_attentions, save_attention, stack_strips
from inputs.processors import processor_for
from layouts import toy
from layouts.toy import (
    LOOK_CLIPS,
    TARGETS,
    TRAIN_CLIPS,
    ball_patches,
    ensure,
    held_out,
    look_share,
    sample,
)
from vlm.casts import use_bf16

EVAL_BATCH = 25  # held-out questions scored together: on a CPU a small LLM call costs about as much for many rows
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy.yaml"
OBJECTS_HELP = "binding only: training clips hold N (or N to M: N-M) objects, a curriculum (held-out clips: 4)"


def span(objects: tuple[int, int]) -> str:
    """(1, 4) -> "1-4", (1, 1) -> "1": how --objects and the world's folder name a count range."""
    return str(objects[0]) if objects[0] == objects[1] else f"{objects[0]}-{objects[1]}"


def objects_arg(text: str) -> tuple[int, int]:
    """--objects N or N-M, 1 <= N <= M <= 4."""
    try:
        low, _, high = text.partition("-")
        objects = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: N or N-M, e.g. 1-4") from None
    if not 1 <= objects[0] <= objects[1] <= len(toy.SHAPES):
        raise argparse.ArgumentTypeError(f"{text!r}: 1 <= N <= M <= {len(toy.SHAPES)}")
    return objects


GLANCE = ["model.mode=coarse_only"]  # what makes the glance: the run config's model trained to read coarse_only


def looks(
    answerer: Answerer, questions: list, reads: dict[str, str], out: Path, seed: int, pictures: int, task: str
) -> dict[str, float]:
    """Mean share of attention on the ball over the first LOOK_CLIPS clips, per {label: read} (and a uniform look);
    attention pictures of the first `pictures` clips, `out/attention/<id>_<label>.png`."""
    model, frames = answerer.model, answerer.frames
    patch, shares = model.encoder.dino.config.patch_size, {}
    chosen = questions[: max(LOOK_CLIPS, pictures)]
    clips = [q.media.frames(frames) for q in chosen]  # (T, 3, H, W) each
    indices = [int(q.id.removeprefix("eval")) for q in chosen]
    scenes = [sample(seed, "eval", i, frames.size, model.frames.max_frames, task)["scene"] for i in indices]
    uniform = [np.mean([ball_patches(s, t, patch).mean() for t in range(s["frames"])]) for s in scenes]
    # each clip after its own question: where the frames follow it, it decides where a question-guided read goes
    processor = processor_for(model)
    ids = [torch.tensor(processor.prompt(q.prompt)) for q in chosen]
    for label, read in reads.items():
        attentions = read_attentions(model, clips, ids, read)  # the clips as one batch
        for q, clip, attention in list(zip(chosen, clips, attentions, strict=True))[:pictures]:
            save_attention(clip, attention, out / "attention" / f"{q.id}_{label}", patch=patch)
        shares[label] = [look_share(a, s, patch) for a, s in zip(attentions, scenes, strict=True)]
    return {"uniform": float(np.mean(uniform)), **{k: float(np.mean(v)) for k, v in shares.items()}}


def asked_twice(answerer: Answerer, questions: list, out: Path, seed: int, pictures: int, read: str) -> list[Path]:
    """The binding task's picture of what a look is worth: each of the first `pictures` held-out clips read after
    two questions that name two different objects (layouts/toy.py `other_questions`), the `read`'s attention
    strips one under another, each labelled with its question: `out/attention/<id>_two_questions.png`."""
    model, frames = answerer.model, answerer.frames
    processor, patch, drawn = processor_for(model), model.encoder.dino.config.patch_size, []
    for q in questions[:pictures]:
        scene = sample(seed, "eval", int(q.id.removeprefix("eval")), frames.size, model.frames.max_frames, "binding")
        asked, clip = toy.other_questions(scene["scene"]), q.media.frames(frames)
        ids = [torch.tensor(processor.prompt(text)) for text in asked]
        with answerer.casts, answerer.autocast:
            attentions = read_attentions(model, [clip, clip], ids, read)
        strips = {}
        for i, (text, attention) in enumerate(zip(asked, attentions, strict=True)):
            save_attention(clip, attention, out / "attention" / f"{q.id}_asked{i}", patch=patch)
            strips[text] = out / "attention" / f"{q.id}_asked{i}.png"
        drawn.append(stack_strips(strips, out / "attention" / f"{q.id}_two_questions", label_width=260))
    return drawn


def evaluate(answerer: Answerer, bench: Any, reads: list[str], out: Path) -> dict:
    """Held-out accuracy per read (in bf16 autocast when the model trained in it: about half the time)."""
    shutil.rmtree(out, ignore_errors=True)  # predictions of an earlier model must not be reused
    return benchmark.evaluate(answerer, bench, "likelihood", reads, out, EVAL_BATCH)


def placed(
    config: str | Path,
    overrides: list[str],
    seed: int | None = None,
    task: str = "ball",
    objects: tuple[int, int] = toy.ALL,
) -> list[str]:
    """The overrides that run the config on another seed, task or curriculum without touching the default run:
    train.seed, and the world and run beside the config's (data/toy -> data/toy_s<seed>, data/toy_cued,
    data/toy_cued_s<seed>, data/toy_binding_o1-4; the same for runs/toy). None for the default seed and the ball: the
    overrides unchanged."""
    parts = ([task] if task != "ball" else []) + ([f"o{span(objects)}"] if tuple(objects) != toy.ALL else [])
    parts += [f"s{seed}"] if seed is not None else []
    moved = beside(config, list(overrides), "_".join(parts)) if parts else list(overrides)
    return moved + ([f"train.seed={seed}"] if seed is not None else [])


def beside(config: str | Path, overrides: list[str], suffix: str) -> list[str]:
    """The overrides that move the config's world and run beside the default ones: data/toy -> data/toy_<suffix>
    (every train and val source), runs/toy -> runs/toy_<suffix>."""
    cfg = load_config(config, list(overrides))
    root = Path(cfg.data.train[0].path).parent.parent
    moved = root.with_name(f"{root.name}_{suffix}")

    def sources(found: list) -> str:
        out = []
        for source in found:
            if not Path(source.path).is_relative_to(root):  # a path, not a string prefix: data/toy_x is not in it
                raise UserError(f"the run moves the world at {root}, but the source {source.path} lies elsewhere")
            out.append({"path": str(moved / Path(source.path).relative_to(root)), "weight": source.weight})
        return json.dumps(out)  # JSON is YAML: the override parser reads it as a list of sources

    out_dir = Path(cfg.train.out_dir)
    args = [f"train.out_dir={out_dir.with_name(f'{out_dir.name}_{suffix}')}", f"data.train={sources(cfg.data.train)}"]
    if cfg.data.val:
        args.append(f"data.val={sources(cfg.data.val)}")
    return [*overrides, *args]


def run(
    config: str | Path = DEFAULT_CONFIG,
    overrides: list[str] = (),
    clips: int = TRAIN_CLIPS,
    pictures: int = 4,
    glance: bool = True,
    seed: int | None = None,
    task: str = "ball",
    objects: tuple[int, int] = toy.ALL,
) -> dict:
    """The toy run (see the module docstring); returns what summary.json holds. `seed`: the same recipe on
    another seed, `task` cued: the world of that task (layouts/toy.py); either in its own world and out_dir
    (`placed`)."""
    start = time.perf_counter()
    overrides = placed(config, list(overrides), seed, task, objects)
    phases: dict[str, float] = {}  # seconds of each part, in the order they ran

    def lap(name: str) -> None:
        phases[name] = round(time.perf_counter() - start - sum(phases.values()), 1)

    cfg = load_config(config, list(overrides))
    root, out = Path(cfg.data.train[0].path).parent.parent, Path(cfg.train.out_dir)
    ensure(
        root, cfg.train.seed, clips, size=cfg.data.frame_size, frames=cfg.data.max_frames, task=task, objects=objects
    )
    bench = benchmark.load_benchmark("toy", held_out(cfg.data.train[0].path))
    lap("world")
    # the glance trains beside the foveated model, step for step on the same batches: one frozen DINOv2 pass each
    glance_cfg = [load_config(config, [*overrides, *GLANCE, f"train.out_dir={out / 'glance'}"])] if glance else []
    final, *glance_final = train.train_together([cfg, *glance_cfg])
    lap("train")
    bf16 = use_bf16(cfg.train.bf16, torch.device("cpu"))  # read as trained (registry.load gives a CPU model)
    foveated = Answerer(registry.load(final).requires_grad_(False), bf16=bf16)  # read only
    if glance:  # where both kept DINOv2 frozen, the glance reads each batch through the foveated model's pass of it
        glance_answerer = Answerer(registry.load(glance_final[0]).requires_grad_(False), bf16=bf16)
        foveated.share_frozen(glance_answerer, -(-len(bench.questions) // EVAL_BATCH))
    results = {"foveated": evaluate(foveated, bench, ["coarse_only", "coarse_fine", "autoregressive"], out / "eval")}
    lap("evaluate")
    if glance:
        results["glance"] = evaluate(glance_answerer, bench, ["coarse_only"], out / "glance" / "eval")
        lap("glance_evaluate")
    shares = looks(foveated, bench.questions, {"static": "coarse_only", "loop": "autoregressive"}, out,
                   cfg.train.seed, pictures, task)  # fmt: skip
    if glance:
        shares["glance"] = looks(glance_answerer, bench.questions, {"glance": "coarse_only"}, out, cfg.train.seed,
                                 pictures, task)["glance"]  # fmt: skip
    for q in bench.questions[:pictures]:  # each clip's reads one under another: <id>.png
        labels = ("loop", "static", "glance") if glance else ("loop", "static")
        stack_strips({label: out / "attention" / f"{q.id}_{label}.png" for label in labels}, out / "attention" / q.id)
    if task == "binding":  # one clip, two questions: where each sent the loop's queries
        asked_twice(foveated, bench.questions, out, cfg.train.seed, pictures, "autoregressive")
    lap("looks")
    summary = {
        "questions": len(bench.questions),
        "chance": results["foveated"]["chance"],
        "accuracy": {name: r["overall"] for name, r in results.items()},
        "by_group": {name: r["groups"]["task"] for name, r in results.items()},
        "share_on_ball": {"clips": min(LOOK_CLIPS, len(bench.questions)), **shares},
        "seconds": round(time.perf_counter() - start),
        "phases": phases,
        "seed": cfg.train.seed,
        "task": task,
        "trained": cfg.model.mode,  # the foveated model's training mode (the glance's is coarse_only)
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report(summary, out)
    return summary


def report(summary: dict, out: Path) -> None:
    acc, look = summary["accuracy"], summary["share_on_ball"]
    n, chance = summary["questions"], summary["chance"]
    print(f"\nheld-out accuracy, {n} questions (likelihood protocol; chance {chance:.0f} %):")
    fov = acc["foveated"]
    modes = "  ".join(f"{m} {fov[m]:5.1f}" for m in ("coarse_only", "coarse_fine", "autoregressive"))
    print(f"  foveated, trained {summary['trained']}:  {modes}")
    if "glance" in acc:
        print(f"  glance, trained coarse_only:    coarse_only {acc['glance']['coarse_only']:5.1f}")
    target = TARGETS[summary.get("task", "ball")]
    print(f"share of attention on {target}, {look['clips']} held-out clips (uniform: {100 * look['uniform']:.0f} %):")
    line = f"  the loop's queries (autoregressive) {100 * look['loop']:.0f} %"
    line += f", its static query {100 * look['static']:.0f} %"
    print(line + (f", the glance's query {100 * look['glance']:.0f} %" if "glance" in look else ""))
    print(f"models: {out / 'final'}" + (f", {out / 'glance' / 'final'}" if "glance" in acc else "")
          + f" (registry.load); attention pictures: {out / 'attention'}")  # fmt: skip
    parts = ", ".join(f"{name} {seconds:.0f}" for name, seconds in summary["phases"].items())
    print(f"toy run took {summary['seconds']} s ({parts})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate if missing, train, evaluate every mode, draw attention")
    r.add_argument("--config", default=str(DEFAULT_CONFIG))
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.max_steps=10")
    r.add_argument("--clips", type=int, default=toy.TRAIN_CLIPS, help="training clips to generate")
    r.add_argument("--no-glance", action="store_true", help="train the foveated model only, not the glance too")
    r.add_argument("--seed", type=int, help="the recipe on seed N: its world in data/toy_sN, its run in runs/toy_sN")
    r.add_argument(
        "--task",
        choices=toy.TASKS,
        default="ball",
        help="cued: the colour of the shape the first frame shows, among four; marked: the colour of the ball where "
        "the first frame shows a white one; binding: one attribute of the object the question names by the other "
        "(world in data/toy_<task>, run in runs/toy_<task>)",
    )
    r.add_argument("--objects", type=objects_arg, default=toy.ALL, help=OBJECTS_HELP + " (data/toy_binding_o<N-M>)")
    g = sub.add_parser("generate", help="write the shards only")
    g.add_argument("--out", default="data/toy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train", type=int, default=toy.TRAIN_CLIPS, help="training clips")
    g.add_argument("--eval", type=int, default=toy.EVAL_CLIPS, help="held-out clips")
    g.add_argument("--size", type=int, default=112, help="frame size in pixels")
    g.add_argument("--frames", type=int, default=4)
    g.add_argument("--task", choices=toy.TASKS, default="ball")
    g.add_argument("--objects", type=objects_arg, default=toy.ALL, help=OBJECTS_HELP)
    a = p.parse_args(argv)
    if a.objects != toy.ALL and a.task != "binding":
        raise UserError(f"--objects {span(a.objects)}: the number of objects a clip holds is the binding task's")
    if a.command == "run":
        run(a.config, a.set, a.clips, glance=not a.no_glance, seed=a.seed, task=a.task, objects=a.objects)
    else:
        toy.generate(a.out, a.seed, a.train, a.eval, a.size, a.frames, a.task, a.objects)


if __name__ == "__main__":
    cli.run(main)
