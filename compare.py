"""Compare the connectors: train every kind with the same backbones, data, steps, batch and seed, evaluate each
the same way, and write one table.

    python compare.py                                   # the toy world, configs/toy.yaml's recipe, every row
    python compare.py --rows foveated,glance,cls_gate --set train.max_steps=100
    python compare.py --task ball                       # another task of the toy world (layouts/toy.py)
    python compare.py --config my_run.yaml --eval data/my_eval_shards   # any shards (benchmark.py's shard schema)

A row is a kind with its own options (ROWS): the model section of configs/toy_<kind>.yaml (configs/toy.yaml for
the foveated model) and the row's overrides, on the base config's backbones and layout (model.frames_at);
everything else (data, optim, train) is the base config's, so the rows differ only in how vision reaches the
LLM. Per row the table gives visual tokens per frame, trainable parameters, held-out accuracy (likelihood
protocol, in the precision each row trained in; per mode for the foveated model), on the toy world the share of
each read's attention on what the question is about (for the kinds that report where they look), training
samples/s and the prefill latency of an 8-frame clip on this machine. Writes OUT/compare.json and
OUT/compare.md; a row whose run finished is not trained again (its out_dir resumes), so a killed comparison
goes on where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import yaml

import benchmark
import cli
import registry
import toyworld
import train
from config import Config, load_config
from evals.answering import Answerer
from evals.timing import device_name, timed
from inputs.processors import processor_for
from layouts import toy
from training.optim import build_optimizer
from vlm.base import VLM
from vlm.casts import use_bf16

REPO = Path(__file__).resolve().parent
KINDS = ("foveated", "pixel_shuffle", "mlp", "cls_gate", "tokenlearner_qformer")
# name: (kind, overrides of its model section). The foveated rows: the frames after the question (its reads
# written from it), the same model with the frames before the question (every read blind to it), and the glance
# (the static query alone, trained so, the frames after the question as the first row's). The other kinds keep
# the base config's layout. pixel_shuffle at 112 px: scale 4 gives 4 tokens a frame (SmolVLM-256M's
# compression), scale 2 gives 16; mlp keeps every patch (64).
ROWS = {
    "foveated": ("foveated", ["model.frames_at=after_question"]),
    "foveated_frames_first": ("foveated", ["model.frames_at=user_turn"]),
    "glance": ("foveated", ["model.frames_at=after_question", "model.mode=coarse_only"]),
    "cls_gate": ("cls_gate", []),
    "tokenlearner_qformer": ("tokenlearner_qformer", []),
    "pixel_shuffle": ("pixel_shuffle", []),
    "pixel_shuffle_16": ("pixel_shuffle", ["model.scale=2"]),
    "mlp": ("mlp", []),
}
EVAL_BATCH = 25  # held-out questions scored together, as the toy run scores them
WHERE = {"after_question": "after question", "user_turn": "before question", "start": "before all text"}  # frames


def kind_config(kind: str) -> Path:
    return REPO / "configs" / ("toy.yaml" if kind == "foveated" else f"toy_{kind}.yaml")


def model_section(base: dict, kind: str) -> dict:
    """The kind's options from its config, on the base config's backbones."""
    options = dict(yaml.safe_load(kind_config(kind).read_text())["model"])
    backbone = base.get("dino") or base.get("tower")
    if backbone:
        options["dino" if kind == "foveated" else "tower"] = backbone
    for key in ("llm", "frames_at"):
        if key in base:
            options[key] = base[key]
    return options


def run_config(base_path: Path, row: str, out: Path, overrides: list[str]):
    """The base config with the row's model section and its own out_dir."""
    kind, options = ROWS[row]
    base = yaml.safe_load(base_path.read_text())
    base["model"] = model_section(base.get("model", {}), kind)
    if kind != "foveated":  # the foveated model's query rate: the other kinds have no queries
        base.get("optim", {}).pop("lr_query", None)
    base.setdefault("train", {}).update(out_dir=str(out / row), resume="auto")
    tmp = out / f"{row}.yaml"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(yaml.safe_dump(base, sort_keys=False))
    return load_config(tmp, [*overrides, *options])


def trainable(model: VLM, cfg) -> int:
    """Parameters the run's optimizer updates (a group with lr 0, and LLM base weights under LoRA, do not count)."""
    opt = build_optimizer(model, cfg.optim)
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def samples_per_s(out: Path) -> float:
    with (out / "log.csv").open(newline="") as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)]
    return statistics.median(rates[1:] or rates)  # the first step warms up


@torch.inference_mode()
def prefill_ms(model: VLM, frames: int = 8) -> float:
    """Median wall ms of [8 frames + a question's prompt] through the model's (last) read, encoding included."""
    size = model.frames.size
    clip = torch.randn(1, frames, 3, size, size)
    mask = torch.ones(1, frames, dtype=torch.bool)
    ids = torch.tensor([processor_for(model).prompt("What colour is the ball?")])
    read = list(model.reads.values())[-1]

    def prefill() -> None:
        model.prefix(model.prepare(clip, mask), ids, torch.ones_like(ids), True, None, **read)

    return 1000 * timed(prefill, torch.device("cpu"), repeats=3)


def answerer_for(model: VLM, cfg: Config) -> Answerer:
    """The kind's model read as it trained: in bf16 where its run trained in bf16 (train.bf16 on this CPU)."""
    return Answerer(model, bf16=use_bf16(cfg.train.bf16, torch.device("cpu")))


def compare(
    base: Path, names: list[str], out: Path, overrides: list[str], eval_root: Path | None, task: str = "binding"
) -> dict:
    rows = []
    if eval_root is None:  # the task's own world beside the config's (data/toy_<task>), as the toy run places it
        moved = toyworld.placed(base, list(overrides), task=task)  # each row keeps its own out_dir
        overrides = [o for o in moved if not o.startswith("train.out_dir=")]
    for name in names:
        cfg = run_config(base, name, out, overrides)
        start = time.perf_counter()
        if eval_root is None:  # the toy world, written on first use as the toy run does
            world = Path(cfg.data.train[0].path).parent.parent
            toy.ensure(world, seed=cfg.train.seed, size=cfg.data.frame_size, frames=cfg.data.max_frames, task=task)
        final = train.train(cfg)
        model = registry.load(final)
        held = toy.held_out(cfg.data.train[0].path) if eval_root is None else eval_root
        bench = benchmark.load_benchmark("toy" if eval_root is None else "shards", held)
        answerer = answerer_for(model, cfg)
        summary = benchmark.evaluate(answerer, bench, "likelihood", list(model.reads), out / name, EVAL_BATCH)
        shares = None
        if eval_root is None and model.kind == "foveated":  # where each read looked (the other kinds: nowhere one)
            with answerer.casts, answerer.autocast:
                shares = toyworld.looks(answerer, bench.questions, dict(zip(model.reads, model.reads, strict=True)),
                                        out / name, cfg.train.seed, 0, task)  # fmt: skip
        rows.append(
            {
                "row": name,
                "kind": model.kind,
                "frames_at": getattr(model.config, "frames_at", None),
                "tokens_per_frame": model.tokens_per_frame,
                "trainable_params": trainable(model, cfg),
                "accuracy": {read: round(summary["overall"][read], 1) for read in model.reads},
                "look_share": None if shares is None else {k: round(100 * v, 1) for k, v in shares.items()},
                "chance": round(summary["chance"], 1),
                "questions": summary["questions"],
                "precision": "bf16" if answerer.bf16 else "fp32",
                "train_samples_per_s": round(samples_per_s(Path(cfg.train.out_dir)), 2),
                "prefill_ms_8_frames": round(prefill_ms(model), 1),
                "seconds": round(time.perf_counter() - start),
            }
        )
        print(f"compare: {name} done: {rows[-1]['accuracy']}", flush=True)
    result = {
        "date": date.today().isoformat(),
        "machine": device_name(torch.device("cpu")),
        "base_config": str(base),
        "task": task if eval_root is None else None,
        "overrides": overrides,
        "steps": cfg.train.max_steps,
        "rows": rows,
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    head = (
        f"Measured {result['date']} on {result['machine']}: {result['base_config']} "
        f"{' '.join(result['overrides'])} ({result['steps']} steps each), likelihood protocol, read in "
        f"{', '.join(sorted({r['precision'] for r in result['rows']}))} as trained, chance "
        f"{result['rows'][0]['chance']} % over {result['rows'][0]['questions']} held-out questions.\n\n"
    )
    lines = [
        "| row | frames | tokens / frame | trainable params | held-out accuracy % | look share % | train samples/s "
        "| prefill 8 frames |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def per_read(values: dict | None) -> str:
        if not values:
            return "–"
        return ", ".join(f"{k} {v}" for k, v in values.items()) if len(values) > 1 else str(next(iter(values.values())))

    for r in result["rows"]:
        lines.append(f"| {r['row']} | {WHERE.get(r.get('frames_at'), '–')} | {r['tokens_per_frame']} | "
                     f"{r['trainable_params'] / 1e6:.2f} M | {per_read(r['accuracy'])} | "
                     f"{per_read(r.get('look_share'))} | {r['train_samples_per_s']} | "
                     f"{r['prefill_ms_8_frames']:.0f} ms |")  # fmt: skip
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "toy.yaml", help="the shared recipe")
    p.add_argument("--rows", default=",".join(ROWS), help=f"some of {', '.join(ROWS)}")
    p.add_argument("--task", choices=toy.TASKS, default="binding", help="the toy world's task (layouts/toy.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.max_steps=100")
    p.add_argument("--eval", type=Path, help="evaluation shards (default: the toy world's held-out split)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = p.parse_args(argv)
    names = args.rows.split(",")
    if unknown := [k for k in names if k not in ROWS]:
        p.error(f"unknown rows {unknown}; expected some of {tuple(ROWS)}")
    result = compare(args.config, names, args.out, args.set, args.eval, args.task)
    print("\n" + markdown(result))
    return result


if __name__ == "__main__":
    cli.run(main)
