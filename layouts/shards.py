"""The training shard format: WebDataset tar files whose samples are members named KEY.<ext>.

A sample is `KEY.json` (the text: pre-tokenized `token_ids` + `loss_mask`, `user`/`assistant`, `turns`, a
`caption`, or DPO's `user`/`chosen`/`rejected`; optional `fps`, the rate numbered frames were extracted at) and its
media: numbered frames `KEY.000.jpg, KEY.001.jpg …`, one video `KEY.mp4` (or webm/mkv/avi/mov), one image
`KEY.jpg` (or png/webp/…), or none for a text-only sample, which is kept. Readers (readers.py, eval_sets.py's
`shards` layout) and the writer (shardwriter.py) agree on it through this module.

A shard is named by a path on this machine, a `pipe:COMMAND` whose stdout is the shard, or a URL that stands for
such a command (`shard_command`): http(s) through curl, s3:// through the AWS CLI, gs:// through gcloud.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shlex
import shutil
from typing import Any

import braceexpand

from config import ConfigError
from inputs.frames import IMAGE_EXTS
from inputs.tokenization import DESCRIBE_PROMPT

VIDEO_EXTS = frozenset({"mp4", "webm", "mkv", "avi", "mov"})
_NUMBERED = re.compile(r"(\d+)\.(\w+)")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# URL scheme -> (the program, the command that writes the shard at {url} to stdout). curl's -f makes an HTTP error
# a failed command rather than an error page read as a tar, -g keeps it from globbing [] and {} in the URL, and
# --retry covers the transient answers (408, 429, 5xx, a connect timeout), which come before any byte is written.
STREAMERS = {
    "http": ("curl", "curl -sSfgL --retry 5 --connect-timeout 30 {url}"),
    "https": ("curl", "curl -sSfgL --retry 5 --connect-timeout 30 {url}"),
    "s3": ("aws", "aws s3 cp {url} -"),
    "gs": ("gcloud", "gcloud storage cat {url}"),
}


def media_of(raw: dict) -> tuple[str, list[Any]]:
    """("frames" | "video" | "image" | "text", payloads), decided from member names alone."""
    numbered = sorted((int(m[1]), k) for k in raw if (m := _NUMBERED.fullmatch(k)) and m[2] in IMAGE_EXTS)
    if numbered:
        return "frames", [raw[k] for _, k in numbered]
    for kind, exts in (("video", VIDEO_EXTS), ("image", IMAGE_EXTS)):
        for k in raw:
            if k in exts:
                return kind, [raw[k]]
    return "text", []


def meta_of(raw: dict) -> dict:
    """The sample's JSON as a dict (ValueError when it is missing or malformed)."""
    if "json" not in raw:
        raise ValueError("no JSON member")
    meta = raw["json"]
    meta = json.loads(meta) if isinstance(meta, bytes | str) else meta
    if not isinstance(meta, dict):
        raise ValueError(f"sample JSON must be an object, got {type(meta).__name__}")
    return meta


def exchange(meta: dict) -> tuple[str, str]:
    """(question, reference answer) of a sample's first exchange, whatever its form."""
    if "turns" in meta:
        turns = [t for t in meta["turns"] if t.get("role") != "system"]
        return turns[0]["content"], next((t["content"] for t in turns if t["role"] == "assistant"), "")
    if "caption" in meta:
        return DESCRIBE_PROMPT, meta["caption"]
    return meta.get("user", ""), meta.get("assistant", meta.get("chosen", ""))


def stated_fps(raw: dict) -> float | None:
    """The frame rate a sample's numbered frames were extracted at, when its JSON states one."""
    try:
        native = meta_of(raw).get("fps")
    except ValueError:
        return None  # the sample is counted as bad JSON when it is encoded
    return float(native) if isinstance(native, int | float) and not isinstance(native, bool) and native > 0 else None


def _local(path: str) -> bool:
    """A path on this machine, as opposed to a `pipe:` command or a URL (http, s3, …)."""
    return not (path.startswith("pipe:") or _SCHEME.match(path))


@functools.lru_cache
def _installed(program: str, search: str | None) -> bool:
    """Whether `program` is on the PATH `search` (asked once per PATH, not once per shard of a long list)."""
    return shutil.which(program, path=search) is not None


def shard_command(path: str) -> str | None:
    """The shell command whose stdout is the shard `path` names; None for a file (a local path or file://).

    A URL's command comes from STREAMERS, checked here, before any reading: a scheme without one, or a program
    that is not installed, is one error saying how to name the shard as a `pipe:` command instead.
    """
    if path.startswith("pipe:"):
        if not path[5:].strip():
            raise ConfigError(f"the shard {path!r} names no command: write 'pipe:COMMAND', e.g. 'pipe:cat a.tar'")
        return path[5:]
    scheme = m[1].lower() if (m := _SCHEME.match(path)) else "file"
    if scheme == "file":
        return None
    instead = "or name the shard as 'pipe:COMMAND', with any command that writes it to stdout"
    if scheme not in STREAMERS:
        known = ", ".join(f"{s}://" for s in STREAMERS)
        raise ConfigError(f"cannot stream the shard {path}: {scheme}:// has no reader here (only {known}); {instead}")
    program, command = STREAMERS[scheme]
    if not _installed(program, os.environ.get("PATH")):
        raise ConfigError(
            f"cannot stream the shard {path}: {scheme}:// shards are read with `{command.format(url='URL')}` and "
            f"`{program}` is not on PATH: install it, {instead} (e.g. 'pipe:curl -sSfL https://…' for a public or "
            "presigned object)"
        )
    return command.format(url=shlex.quote(path))


def expand_shards(spec: str | list[str] | None, must_exist: bool = False) -> list[str]:
    """Brace lists and globs → shard paths, in a deterministic order every rank agrees on.

    A glob that matches nothing is an error (a typo would otherwise train on nothing). With `must_exist`, so is a
    local path that does not exist, or names a folder, checked here before any work: a misspelt folder in the brace
    form of the stage configs would otherwise surface as one warning per shard while the reader skips them all,
    then as an error blaming empty shards. Training's reader asks for it; the benchmark's and the captions'
    loaders check the paths themselves, to name their layout. `pipe:` commands and URLs (http, s3, …) are passed
    through unchecked: braces expand in them as in paths, and whether they can be read shows when they are read.
    """
    out: list[str] = []
    for pattern in [spec] if isinstance(spec, str) else spec or []:
        named = list(braceexpand.braceexpand(pattern))
        missing: list[str] = []
        for path in named:
            if not _local(path):
                out.append(path)
            elif re.search(r"[*?\[]", path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no shards match {path!r}: fix the path, or write the shards first")
                out.extend(matches)
            elif must_exist and os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a folder, not a shard: name its shards, e.g. '{path}/*.tar'")
            elif must_exist and not os.path.exists(path):
                missing.append(path)
            else:
                out.append(path)
        if missing:
            which = f" ({len(missing)} of the {len(named)} that {pattern!r} names)" if len(named) > 1 else ""
            raise FileNotFoundError(f"no shard at {missing[0]}{which}: fix the path, or write the shards first")
    return out
