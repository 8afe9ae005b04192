"""Ask a FoveatedVLM about an image or a video.

    python chat.py --media clip.mp4 "What happens in this video?"
    python chat.py --model runs/toy/final --media photo.jpg "What colour is the square?"

Without --model the model is built from the pretrained backbones (hub, else the packaged
weights) with a fresh, untrained connector: it runs end to end, but only a trained
checkpoint answers about what it sees.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from config import ModelConfig
from frames import load_media
from model import MODES, FoveatedVLM
from tokenization import prompt_ids


def ask(
    model: FoveatedVLM,
    media: str | Path | None,
    question: str,
    mode: str = "autoregressive",
    max_new_tokens: int = 64,
    max_frames: int | None = None,
    replicate_image_frames: int | None = None,
    size: int | None = None,
) -> str:
    """One greedy answer to `question` about an image/video file (or none, for a text-only question).

    Frames are read as the model was trained to see them (`model.frames`) unless a setting is given."""
    if model.tokenizer is None:
        raise ValueError("the model carries no tokenizer; load it with from_pretrained or from_backbones")
    fed = model.frames
    size = fed.size if size is None else size
    max_frames = fed.max_frames if max_frames is None else max_frames
    copies = fed.image_frames if replicate_image_frames is None else replicate_image_frames
    device = next(model.parameters()).device
    frames = (
        load_media(media, max_frames, copies, size, fed.fps) if media is not None else torch.zeros(0, 3, size, size)
    )[None].to(device)  # (1, T, 3, H, W)
    frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=device)
    ids = torch.tensor([prompt_ids(model.tokenizer, question)], device=device)
    new = model.generate(
        frames,
        frame_mask,
        ids,
        torch.ones_like(ids),
        mode=mode,
        max_new_tokens=max_new_tokens,
        eos_token_id=model.tokenizer.eos_token_id,
    )
    return model.tokenizer.decode(new[0], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question")
    p.add_argument("--media", help="image or video file; omit for a text-only question")
    p.add_argument("--model", help="a saved FoveatedVLM directory (default: fresh connector on the backbones)")
    p.add_argument("--backbones", default=None, help="with no --model: hub id / dir / 'packaged' for both backbones")
    p.add_argument("--mode", default="autoregressive", choices=MODES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-frames", type=int, help="frames sampled from a video (default: the model's)")
    p.add_argument("--frame-size", type=int, help="pixels (default: the size the model was trained at)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.model:
        model = FoveatedVLM.from_pretrained(args.model)
    elif args.backbones:
        model = FoveatedVLM.from_backbones(ModelConfig(dino=args.backbones, llm=args.backbones))
    else:
        model = FoveatedVLM.from_backbones()
    model = model.to(args.device).eval()
    reply = ask(model, args.media, args.question, args.mode, args.max_new_tokens, args.max_frames, size=args.frame_size)
    print(reply if reply else "(the model's reply is empty: it ended its turn at once)")


if __name__ == "__main__":
    main()
