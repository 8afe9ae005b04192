"""Ask a saved model (any kind) about an image or a video.

    python chat.py --media clip.mp4 "What happens in this video?"
    python chat.py --model runs/toy/final --media photo.jpg "What colour is the ball?" [--read coarse_only]

Without --model the foveated model is built from the pretrained backbones (hub, else the packaged
weights) with a fresh, untrained connector: it runs end to end, but only a trained checkpoint answers
about what it sees. Media are read as the model was trained to see them (its saved frame settings).

A reply is greedy under transformers' two rules against repeating, so that a small model does not loop on a
phrase: a repetition penalty of 1.2 and no 3-gram twice (`--repetition-penalty 1.0` and
`--no-repeat-ngram-size 0` turn them off: the benchmarks' plain greedy decode).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import cli
import registry
from cli import UserError
from config import FoveatedConfig
from evals.answering import Answerer
from inputs.frames import Media
from vlm.base import VLM

REPETITION_PENALTY = 1.2  # a chat's defaults (the demo's too); generate's own are off, as benchmarks decode
NO_REPEAT_NGRAM_SIZE = 3


def ask(
    model: VLM,
    media: str | Path | None,
    question: str,
    read: str | None = None,
    max_new_tokens: int = 64,
    max_frames: int | None = None,
    size: int | None = None,
    repetition_penalty: float = REPETITION_PENALTY,
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE,
) -> str:
    """One greedy answer to `question` about an image/video file (or none, for a text-only question), in the
    named read (default: the model's last one, the foveated model's autoregressive mode), under the chat's rules
    against repeating (1.0 and 0: none, as the benchmarks decode)."""
    answerer = Answerer(model, max_frames, size=size)
    read = read or list(answerer.reads)[-1]
    if read not in answerer.reads:  # before the media is decoded
        raise UserError(f"this model reads in {list(answerer.reads)}, not {read!r}")
    state = answerer.prepare(Media.at(media))
    rules = {"repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size}
    return answerer.generate(state, question, read, max_new_tokens, **rules)


def add_repetition_flags(p: argparse.ArgumentParser) -> None:
    """The rules against repeating as flags, shared with the demo (app.py)."""
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=REPETITION_PENALTY,
        help=f"CTRL's penalty on tokens already said or asked (default {REPETITION_PENALTY}; 1.0: off)",
    )
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=NO_REPEAT_NGRAM_SIZE,
        help=f"no n-gram of this many tokens twice (default {NO_REPEAT_NGRAM_SIZE}; 0: off)",
    )


def check_repetition_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values generate would refuse, as a usage error before any model loads."""
    if not args.repetition_penalty > 0:
        p.error(f"--repetition-penalty must be positive (1.0 turns it off), not {args.repetition_penalty}")
    if args.no_repeat_ngram_size < 0:
        p.error(f"--no-repeat-ngram-size must be 0 (off) or more, not {args.no_repeat_ngram_size}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question")
    p.add_argument("--media", help="image or video file; omit for a text-only question")
    p.add_argument("--model", help="a saved model directory (default: a fresh foveated connector on the backbones)")
    p.add_argument("--backbones", default=None, help="with no --model: hub id / dir / 'packaged' for both backbones")
    p.add_argument("--read", "--mode", dest="read", help="how to read the frames, e.g. a foveated mode")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-frames", type=int, help="frames sampled from a video (default: the model's)")
    p.add_argument("--frame-size", type=int, help="pixels (default: the size the model was trained at)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_repetition_flags(p)
    args = p.parse_args(argv)
    check_repetition_flags(p, args)
    if args.model:
        model = registry.load(args.model)
    elif args.backbones:
        model = registry.new_model(FoveatedConfig(dino=args.backbones, llm=args.backbones))
    else:
        model = registry.new_model(FoveatedConfig())
    model = model.to(args.device).eval()
    reply = ask(model, args.media, args.question, args.read, args.max_new_tokens, args.max_frames, args.frame_size,
                args.repetition_penalty, args.no_repeat_ngram_size)  # fmt: skip
    print(reply if reply else "(the model's reply is empty: it ended its turn at once)")


if __name__ == "__main__":
    cli.run(main)
