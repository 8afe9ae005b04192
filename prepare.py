"""Bring a training set in: its published layout → the project's WebDataset shards.

    python prepare.py SOURCE --in PATH [--images DIR] --out DIR [--shard-size N] [--limit N] [--workers N]
                      [--frame-size S] [--max-frames N] [--fps F] [--drop-system]

SOURCE is one of layouts.converters.NAMES; each reader's docstring gives the layout it expects, and an input not in
it (no record read, a missing column) is one error quoting that layout. Rerunning the same command continues an
interrupted conversion; rerunning with other options into the same OUT is refused, OUT left as it was, since either
way of going on would spoil what is there. OUT/report.json says what was written and what was left out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

import cli
from layouts import shardwriter
from layouts.converters import NAMES
from layouts.shardwriter import Options, convert

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", choices=NAMES)
    p.add_argument("--in", dest="src", type=Path, required=True, help="the annotation file (or folder of files)")
    p.add_argument("--images", type=Path, help="the folder of images or videos (default: as the layout has it)")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and report.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--limit", type=int, help="convert only the first N records")
    p.add_argument("--workers", type=int, default=1, help="processes checking and encoding media (same output)")
    p.add_argument("--frame-size", type=int, help="re-encode media as JPEG frames of S×S (default 224)")
    p.add_argument("--max-frames", type=int, help="re-encode videos as at most N frames (default 64)")
    p.add_argument("--fps", type=float, help="re-encode videos sampled at F frames a second")
    p.add_argument("--drop-system", action="store_true", help="remove leading system messages (SmolTalk)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format=FORMAT, stream=sys.stderr)  # a no-op where logging is set up
    file_log = logging.FileHandler(args.out / "prepare.log")  # appended to by every run, resumed ones included
    file_log.setFormatter(logging.Formatter(FORMAT))
    writer_log = logging.getLogger(shardwriter.__name__)
    writer_log.setLevel(logging.INFO)
    writer_log.addHandler(file_log)
    opts = Options(args.shard_size, args.limit, args.frame_size, args.max_frames, args.fps, args.drop_system)
    try:
        with logging_redirect_tqdm():
            return convert(args.source, args.src, args.images, args.out, opts, args.workers)
    finally:
        writer_log.removeHandler(file_log)
        file_log.close()


if __name__ == "__main__":
    cli.run(main)
