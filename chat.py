"""Ask a saved model (any kind) about an image or a video.

    python chat.py --media clip.mp4 "What happens in this video?"
    python chat.py --model runs/toy/final --media photo.jpg "What colour is the ball?" [--read coarse_only]

Without --model the foveated model is built from the pretrained backbones (hub, else the packaged
weights) with a fresh, untrained connector: it runs end to end, but only a trained checkpoint answers
about what it sees. Media are read as the model was trained to see them (its saved frame settings).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import cli
import registry
from config import FoveatedConfig
from evals.answering import Answerer
from inputs.frames import Media
from vlm.base import VLM


def ask(
    model: VLM,
    media: str | Path | None,
    question: str,
    read: str | None = None,
    max_new_tokens: int = 64,
    max_frames: int | None = None,
    size: int | None = None,
) -> str:
    """One greedy answer to `question` about an image/video file (or none, for a text-only question), in the
    named read (default: the model's last one, the foveated model's autoregressive mode)."""
    answerer = Answerer(model, max_frames, size=size)
    read = read or list(answerer.reads)[-1]
    if read not in answerer.reads:
        raise ValueError(f"this model reads in {list(answerer.reads)}, not {read!r}")
    return answerer.generate(answerer.prepare(Media.at(media)), question, read, max_new_tokens)


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
    args = p.parse_args(argv)
    if args.model:
        model = registry.load(args.model)
    elif args.backbones:
        model = registry.new_model(FoveatedConfig(dino=args.backbones, llm=args.backbones))
    else:
        model = registry.new_model(FoveatedConfig())
    model = model.to(args.device).eval()
    reply = ask(model, args.media, args.question, args.read, args.max_new_tokens, args.max_frames, args.frame_size)
    print(reply if reply else "(the model's reply is empty: it ended its turn at once)")


if __name__ == "__main__":
    cli.run(main)
