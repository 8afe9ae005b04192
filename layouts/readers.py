"""Readers of each training layout: units of work, and the raw samples in each unit.

A reader's `units()` is a list dealt out once per epoch across the ranks (a shard, or one record of a JSON
layout); `samples(unit)` yields raw samples in the processors' form (`__key__`, `json`, media members whose
values are bytes or file paths: see processors.py). The JSON layouts give paths, so a worker that does not
decode a sample never reads its image.

- `ShardReader`: WebDataset shards in the project's format, read from files or streamed from a command's stdout
  (a `pipe:` command or a URL: shards.shard_command). A tar that cannot be read is counted as bad_shard, the rest
  of it skipped; a command that fails (a download that does not start or breaks off) stops the epoch with one
  UnreadableShard error naming the shard;
- `TextVQAReader`: TextVQA's published layout, each question asked with the short-answer prompt the benchmark
  evaluates with, answered by its most frequent answer;
- `CaptionReader`: captions in the Karpathy-split JSON or COCO 2017's layout (caption_sets.py), one sample per
  caption or per image (a caption drawn per epoch).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator, tarfile_samples

from cli import UserError
from config import CaptionSource, ConfigError, ShardSource, SourceConfig, TextVQASource
from inputs.tokenization import CAPTION_PROMPT
from layouts import textvqa
from layouts.caption_sets import read_coco_captions, read_karpathy, training_samples
from layouts.shards import expand_shards, shard_command

log = logging.getLogger(__name__)


class UnreadableShard(UserError):
    """A shard's command failed. Not skipped as a corrupt shard is: a corrupt file reads the same every time, but a
    download that fails once may succeed in another DataLoader worker (each reads all of its rank's shards) or on
    resume, and the batches would stop being one sequence. The run stops instead, and resumes exactly."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message  # WebDataset's tar reader appends to `args`; the message stays as written

    def __str__(self) -> str:
        return self.message


class _CommandStream:
    """A shell command's stdout as a file whose end comes only after the command exited 0, so that a download that
    broke off between two members is an error rather than a shorter shard. Its stderr (kept in a temporary file, so
    that it cannot fill a pipe) gives the error its reason."""

    def __init__(self, shard: str, command: str) -> None:
        self.shard, self.command, self.done = shard, command, False
        self.err = tempfile.TemporaryFile()
        out = subprocess.PIPE
        self.proc = subprocess.Popen(command, shell=True, stdout=out, stderr=self.err, start_new_session=True)

    def read(self, size: int = -1) -> bytes:
        data = self.proc.stdout.read(size)
        if not data and size != 0:
            self._exited()
        return data

    def finish(self) -> None:
        """Read past the tar's end to the command's, and check how it ended."""
        while self.proc.stdout.read(1 << 16):
            pass
        self._exited()

    def _exited(self) -> None:
        if self.done:
            return
        status, self.done = self.proc.wait(), True
        if status != 0:
            self.err.seek(0)
            said = [line.strip() for line in self.err.read().decode(errors="replace").splitlines() if line.strip()]
            reason = f": {said[-1][:300]}" if said else ""
            raise UnreadableShard(
                f"cannot read the shard {self.shard}: `{self.command}` exited with status {status}{reason}; make it "
                "readable, then resume the run (train.resume=auto)"
            )

    def close(self) -> None:
        """Stop the command (and what it started) unless it has ended: the reader may stop early."""
        if not self.done:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the shell's children go with it
            except ProcessLookupError:
                pass
        self.proc.stdout.close()
        self.proc.wait()
        self.err.close()

    def __str__(self) -> str:
        return self.shard


class ShardReader:
    shuffled_within = False  # samples come in shard order: the loader's shuffle buffer mixes them

    def __init__(self, source: ShardSource) -> None:
        self.shards = expand_shards(source.path, must_exist=True)
        if not self.shards:
            raise ConfigError(f"the shards source {source.path!r} names no shard: give a glob, brace list or path")
        self.commands = {shard: shard_command(shard) for shard in self.shards}  # a URL it cannot stream: an error now

    def units(self, epoch: int = 0) -> list[Any]:
        return list(self.shards)

    def samples(self, unit: Any, counts: Counter, epoch: int = 0) -> Iterator[dict]:
        try:
            yield from self._read(unit)
        except UnreadableShard:
            raise
        except Exception as e:  # tar and gzip errors mean the rest of this shard is lost, as with a local file
            counts["bad_shard"] += 1
            log.warning("data: skipping the rest of shard %s: %s", unit, e)

    def _read(self, unit: str) -> Iterator[dict]:
        command = self.commands[unit] if unit in self.commands else shard_command(unit)
        if command is None:
            yield from tarfile_samples([{"url": unit}])
            return
        stream = _CommandStream(unit, command)
        try:
            yield from group_by_keys(self._members(stream))
        finally:
            stream.close()

    @staticmethod
    def _members(stream: _CommandStream) -> Iterator[dict]:
        """The tar's files as WebDataset's expander gives them, its end-of-shard marker only once the command has
        ended well (the shard's last sample is held back until then)."""
        for member in tar_file_iterator(stream):
            yield {**member, "__url__": stream.shard}
        stream.finish()
        yield {}

    def size(self) -> int | None:
        return None  # unknown without reading every shard


class TextVQAReader:
    shuffled_within = True  # units are single questions

    def __init__(self, source: TextVQASource, seed: int = 0) -> None:
        self.questions = textvqa.load_questions(source.root, source.split)
        n = len(self.questions)
        keep = range(n)
        if source.split == "train" and source.subset and source.subset < n:
            keep = sorted(random.Random(f"{seed}:subset").sample(range(n), source.subset))
        self.keep = list(keep)

    def units(self, epoch: int = 0) -> list[Any]:
        return list(self.keep)

    def samples(self, unit: Any, counts: Counter, epoch: int = 0) -> Iterator[dict]:
        q = self.questions[unit]
        yield {"__key__": q.question_id, "json": {"user": q.prompt, "assistant": q.answer}, "jpg": q.image}

    def size(self) -> int | None:
        return len(self.keep)


class CaptionReader:
    shuffled_within = True

    def __init__(self, source: CaptionSource, seed: int = 0) -> None:
        path = Path(source.file)
        images = source.images or None
        found = read_karpathy(path, images, source.split) if path.is_file() else read_coco_captions(path, source.split)
        self.records, self.per, self.seed = found.records, source.per, seed

    def units(self, epoch: int = 0) -> list[Any]:
        return [(s.id, s.image, s.caption) for s in training_samples(self.records, self.per, self.seed, epoch)]

    def samples(self, unit: Any, counts: Counter, epoch: int = 0) -> Iterator[dict]:
        key, image, caption = unit
        ext = Path(image).suffix.lower().lstrip(".") or "jpg"
        yield {"__key__": str(key), "json": {"user": CAPTION_PROMPT, "assistant": caption}, ext: Path(image)}

    def size(self) -> int | None:
        return len(self.units(0))


def open_reader(source: SourceConfig, seed: int = 0) -> ShardReader | TextVQAReader | CaptionReader:
    if isinstance(source, ShardSource):
        return ShardReader(source)
    if isinstance(source, TextVQASource):
        return TextVQAReader(source, seed)
    if isinstance(source, CaptionSource):
        return CaptionReader(source, seed)
    raise ValueError(f"no reader for data sources of kind {source.kind!r}")
