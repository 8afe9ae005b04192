"""Evaluate a saved model on MVBench, Video-MME, ScienceQA-IMG, TextVQA, the toy world or evaluation shards,
or caption a caption set (Flickr30k, COCO, caption shards: `--bench captions`, captioning.py).

    python benchmark.py --model runs/stage2/final --bench mvbench --data-root data/MVBench
    python benchmark.py --model DIR --bench videomme --data-root data/Video-MME --protocol generate \
        --reads autoregressive
    python benchmark.py --model smolvlm_dir --bench textvqa --data-root data/TextVQA --limit 500
    python benchmark.py --model DIR --bench captions --data-root data/flickr30k/dataset_flickr30k.json --num-beams 3

Multiple-choice protocols (a published number compares only with one of the same protocol):
  likelihood  every option scored as the assistant answer "X. option" (mean token cross-entropy over the
              answer and its end-of-turn token); the lowest wins. The default.
  generate    a greedy reply of at most 16 tokens to lmms-eval 0.7.3's default prompt, the letter read from it
              with lmms-eval's rule for that benchmark (metrics.py); --prompt-variant picks a model-specific
              prompt instead (benchmarks.PROMPT_VARIANTS), named in the results.
Open questions (TextVQA) are always generated and scored with the VQA accuracy. Every question counts in
the accuracy, an empty reply as wrong, except in MVBench's generate figures: there `overall` and the task
groups are lmms-eval's, which leave empty replies out, with ours beside them under `all_questions`.

Each question's media is decoded and encoded once and reused by every read; options share one prefix, and with
--batch-size N the likelihood protocol encodes and scores N questions in one batch.
Writes OUT/<bench>_<protocol>.jsonl (one line per question holding every read; `_<variant>` added to the name
for a prompt variant) and the summary OUT/<bench>_<protocol>.json; run again and only the questions the
predictions file lacks are answered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import cli
import registry
from evals import captioning
from evals.answering import Answerer
from evals.metrics import LMMS_EVAL_VERSION, mvbench_summary, normalize_answer, vqa_accuracy
from evals.results import claim, default_out, read_predictions, weights_digest
from inputs.frames import MediaError
from layouts.eval_sets import LETTERS, NAMES, PROMPT_VARIANTS, Benchmark, DatasetMissing, Question, load_benchmark

PROTOCOLS = ("likelihood", "generate")
MAX_NEW_TOKENS = 16  # lmms-eval's setting for these benchmarks


def answer_questions(
    answerer: Answerer, bench: Benchmark, questions: list[Question], protocol: str, reads: list[str]
) -> list[dict]:
    """Questions in every read (the foveated model's reads), each clip decoded and encoded once however many of the
    questions are about it, each question read on its own (with the frames after the question, the foveated
    model's reads are written from it): the JSONL records (score 1/0, or VQA accuracy). Multiple-choice questions
    under the likelihood protocol are encoded and scored as one batch (per question what it would get alone, up
    to float rounding); replies are generated one question at a time."""
    records, ready, clips, decoded = [], [], {}, []  # clips: media -> its index in `decoded`, or its MediaError
    for q in questions:
        record: dict = {"id": q.id, "groups": q.groups, "answer": q.answer, "options": len(q.options), "reads": {}}
        records.append(record)
        key = (q.media.kind, tuple(q.media.items), q.media.start, q.media.end, q.media.fps)
        if key not in clips:
            try:
                decoded.append(q.media.pictures(answerer.frames))
                clips[key] = len(decoded) - 1
            except MediaError as e:
                clips[key] = e
        if isinstance(clips[key], MediaError):  # counted as wrong in every read, and reported
            record["error"] = str(clips[key])
            record["reads"] = {m: {"pred": "", "score": 0.0} for m in reads}
        else:
            ready.append((q, record, clips[key]))
    scored = [r for r in ready if r[0].options and protocol == "likelihood"]
    if scored:
        used = sorted({c for _, _, c in scored})  # the clips these questions are about, encoded once each
        batch = answerer.prepare_batch([decoded[c] for c in used])
        which = [used.index(c) for _, _, c in scored]
        prompts, answers = [q.prompt for q, _, _ in scored], [option_answers(q) for q, _, _ in scored]
        for read in reads:
            scores = answerer.score_batch(batch, prompts, answers, read, which)
            for (q, record, _), losses in zip(scored, scores, strict=True):
                pred = LETTERS[min(range(len(losses)), key=losses.__getitem__)]
                losses = [round(v, 5) for v in losses]
                record["reads"][read] = {"pred": pred, "losses": losses, "score": float(pred == q.answer)}
    states: dict[int, Any] = {}
    for q, record, clip in ready:
        if q.options and protocol == "likelihood":
            continue
        if clip not in states:
            states[clip] = answerer.prepare_pictures(decoded[clip])
        state = states[clip]
        for read in reads:
            reply = answerer.generate(state, q.prompt, read, MAX_NEW_TOKENS)
            record["reads"][read] = {"reply": reply, **reply_score(bench, q, reply)}
    return records


def option_answers(q: Question) -> list[str]:
    """The assistant answers a multiple-choice question's options are scored as."""
    return [f"{x}. {o}" for x, o in zip(LETTERS, q.options, strict=False)] if q.lettered else q.options


def reply_score(bench: Benchmark, q: Question, reply: str) -> dict:
    """The prediction read from a reply, and its score."""
    letters = LETTERS[: len(q.options)]
    if not q.options:
        return {"pred": reply, "score": vqa_accuracy(reply, q.answer)}
    if q.lettered:
        pred = bench.letter(reply, len(q.options))
    else:  # a plain reply is the option it equals
        said = normalize_answer(reply)
        pred = next((x for x, o in zip(letters, q.options, strict=True) if normalize_answer(o) == said), "")
    return {"pred": pred, "score": float(pred == q.answer)}


def summarize(records: list[dict], reads: list[str]) -> dict:
    """Percentages per read: overall and per value of every group key (task, duration, domain, …)."""

    def score(rows: list[dict]) -> dict:
        return {"n": len(rows), **{m: 100 * sum(r["reads"][m]["score"] for r in rows) / len(rows) for m in reads}}

    by_group: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for key, value in r["groups"].items():
            by_group[key][value].append(r)
    mcq = [r for r in records if r["options"]]
    return {
        "overall": score(records) if records else {"n": 0},
        "chance": 100 * sum(1 / r["options"] for r in mcq) / len(mcq) if mcq else None,
        "errors": sum("error" in r for r in records),
        "groups": {k: {v: score(rows) for v, rows in sorted(vals.items())} for k, vals in sorted(by_group.items())},
    }


def evaluate(
    answerer: Answerer, bench: Benchmark, protocol: str, reads: list[str], out: Path, batch_size: int = 1
) -> dict:
    """Answer the questions the predictions file lacks (appending as it goes, `batch_size` questions at a time),
    then write the summary."""
    out.mkdir(parents=True, exist_ok=True)
    variant = "" if bench.variant == "default" else f"_{bench.variant}"  # a variant never resumes another's answers
    stem = out / f"{bench.name}_{protocol}{variant}{'_bf16' if answerer.bf16 else ''}"  # nor bf16 reads fp32 ones
    setting = {
        "model": weights_digest(answerer.model),
        "kind": answerer.model.kind,
        "bench": bench.name,
        "protocol": protocol,
        "prompt_variant": bench.variant,
        "bf16": answerer.bf16,
        "frames": dataclasses.asdict(answerer.frames),
    }
    claim(stem, setting)
    done = read_predictions(stem.with_suffix(".jsonl"))
    todo = [q for q in bench.questions if not set(reads) <= set(done.get(q.id, {}).get("reads", {}))]
    with (
        stem.with_suffix(".jsonl").open("a") as f,
        tqdm(total=len(todo), desc=f"{bench.name} ({protocol})", unit="q", disable=not todo) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            for record in answer_questions(answerer, bench, todo[start : start + batch_size], protocol, reads):
                done[record["id"]] = record
                f.write(json.dumps(record) + "\n")
            f.flush()
            bar.update(len(todo[start : start + batch_size]))
    summary = {
        "bench": bench.name,
        "protocol": "generate" if all(not q.options for q in bench.questions) else protocol,
        "metric": "vqa_accuracy" if any(not q.options for q in bench.questions) else "accuracy",
        "reads": reads,
        "lmms_eval": LMMS_EVAL_VERSION,
        "prompt_variant": bench.variant,
        "bf16": answerer.bf16,
        "questions": len(bench.questions),
        "answered_now": len(todo),
        **summarize([done[q.id] for q in bench.questions], reads),
    }
    if bench.name == "mvbench" and protocol == "generate":  # lmms-eval's figures first, ours beside them
        lmms = mvbench_summary([done[q.id] for q in bench.questions], reads)
        summary["all_questions"] = {"overall": summary["overall"], "task": summary["groups"].get("task", {})}
        summary["overall"], summary["groups"]["task"] = lmms["overall"], lmms["tasks"]
        summary["empty_replies"] = lmms["empty_replies"]
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict) -> None:
    chance = f", chance {summary['chance']:.1f}" if summary["chance"] is not None else ""
    head = f"{summary['bench']} ({summary['protocol']}, {summary['metric']} %, {summary['questions']} questions"
    print(f"\n{head}{chance})")
    for read in summary["reads"]:
        print(f"  {read:<16} {summary['overall'][read]:6.2f}")
    if summary["errors"]:
        print(f"  {summary['errors']} questions had undecodable media (scored wrong)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved model directory (any kind)")
    p.add_argument("--bench", required=True, choices=(*NAMES, "captions"))
    p.add_argument(
        "--data-root",
        required=True,
        help="the benchmark's directory (shards: a directory, glob or list; captions: a Karpathy-split JSON, a COCO "
        "2017 root or caption shards)",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: likelihood, or generate for textvqa")
    p.add_argument(
        "--prompt-variant",
        default="default",
        choices=list(PROMPT_VARIANTS),
        help="default: lmms-eval 0.7.3's default prompts; llava_vid, legacy: Video-MME's model-specific 'The best "
        "answer is:' prompt, legacy with the letter reader lmms-eval used before 0.7.2",
    )
    p.add_argument(
        "--reads",
        help="comma-separated reads, e.g. the foveated model's coarse_only,autoregressive (default: every read it has)",
    )
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="multiple-choice questions encoded and scored together under the likelihood protocol (default 1); "
        "the same answers up to float rounding, several times faster on a CPU",
    )
    p.add_argument("--out", type=Path, help="default: runs/eval/<the model's path, separators as _>")
    p.add_argument("--image-frames", type=int, help="copies that make an image a clip (default: the model's)")
    p.add_argument("--max-frames", type=int, help="frames sampled uniformly from a video (default: the model's)")
    p.add_argument("--frame-size", type=int, help="pixels (default: the size the model was trained at)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--bf16", action="store_true", help="read under bf16 autocast (GPU or avx512_bf16 CPU; fp32 weights)"
    )
    c = p.add_argument_group("captions (--bench captions; see captioning.py)")
    c.add_argument("--split", help="Karpathy split (default test) or COCO 2017 split (default val)")
    c.add_argument("--images", help="the images root of a Karpathy JSON (default: its folder) or of COCO 2017")
    c.add_argument("--num-beams", type=int, default=3, help="beam width (default 3; 1: greedy)")
    c.add_argument(
        "--length-penalty", type=float, default=1.0, help="beams are ranked by log-prob / length ** this (default 1)"
    )
    c.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeated n-grams of this size (0: off)")
    c.add_argument("--max-new-tokens", type=int, default=30, help="caption length limit (default 30)")
    args = p.parse_args(argv)
    if args.bench == "captions":
        return captioning.main(args, p)
    protocol = args.protocol or ("generate" if args.bench == "textvqa" else "likelihood")
    if args.bench == "textvqa" and protocol != "generate":
        p.error("TextVQA has open answers: only the generate protocol applies")
    if args.bench not in PROMPT_VARIANTS[args.prompt_variant]:
        p.error(f"prompt variant {args.prompt_variant} applies to {', '.join(PROMPT_VARIANTS[args.prompt_variant])}")
    try:
        bench = load_benchmark(args.bench, args.data_root, args.limit, args.prompt_variant)
    except DatasetMissing as e:
        sys.exit(str(e))
    model = registry.load(args.model).to(args.device)
    answerer = Answerer(model, args.max_frames, args.image_frames, args.frame_size, bf16=args.bf16)
    reads = args.reads.split(",") if args.reads else list(answerer.reads)
    if unknown := [m for m in reads if m not in answerer.reads]:
        p.error(f"reads {unknown} are not among this model's {list(answerer.reads)}")
    out = args.out or default_out(args.model)
    summary = evaluate(answerer, bench, protocol, reads, out, args.batch_size)
    print_summary(summary)
    print(f"predictions and summary in {out}")
    return summary


if __name__ == "__main__":
    cli.run(main)
