"""Shards streamed from a command's stdout (`pipe:`, http, s3) read exactly as the same shards on disk: every sample
once per epoch over the ranks, an exact resume, a corrupt shard skipped and counted as a local one is, and a shard
that cannot be fetched one error naming it. The HTTP server is a real one on 127.0.0.1; the shards are written by
the project's own writer (prepare.py's llava converter: images and text-only samples)."""

from __future__ import annotations

import json
import shutil
import socket
import tarfile
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import jpeg

import cli
import data
from config import ConfigError, DataConfig, ShardSource
from layouts import shardwriter
from layouts.readers import ShardReader, UnreadableShard
from layouts.shards import expand_shards, shard_command
from tests.test_data import run, same

SHARDS, PER = 6, 5
NAMES = "llava-{000000..000005}.tar"
KEYS = [f"{i:09d}" for i in range(SHARDS * PER)]

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Six shards of five samples; two in three have an image, the others are text-only."""
    root = tmp_path_factory.mktemp("llava")
    entries = []
    for i in range(SHARDS * PER):
        turns = [{"from": "human", "value": f"<image>\nquestion {i}"}, {"from": "gpt", "value": f"answer {i}"}]
        entries.append({"id": f"e{i}", "conversations": turns})
        if i % 3:
            (root / f"{i}.jpg").write_bytes(jpeg((8 * i, 100, 200)))
            entries[-1]["image"] = f"{i}.jpg"
    (root / "llava.json").write_text(json.dumps(entries))
    out = root / "shards"
    report = shardwriter.convert("llava", root / "llava.json", None, out, shardwriter.Options(shard_size=PER))
    assert [s["name"] for s in report["shards"]] == expand_shards(NAMES) and report["samples"] == SHARDS * PER
    return out


@pytest.fixture(scope="module")
def server(shards):
    """(base URL, requests per path) of an HTTP server over the shards' folder."""
    fetched: Counter = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(shards), **kwargs)

        def do_GET(self):
            fetched[self.path] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", fetched
    httpd.shutdown()
    httpd.server_close()


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def config(path, **kw):
    """One shards source (a path, URL or command, or a list of them) at test_data's tiny frame settings."""
    base = dict(num_workers=0, shuffle_buffer=0, frame_size=16, max_frames=8, replicate_image_frames=3)
    return DataConfig(train=[ShardSource(path=path)], **{**base, **kw})


def streamed(path, **kw):
    return config(path, batch_size=2, shuffle_buffer=4, **kw)


@needs_curl
def test_http_shards_over_two_ranks_are_read_once_per_epoch_exactly_as_local_ones(shards, server, tokenizer):
    url, fetched = server
    for epoch in (0, 1):
        fetched.clear()
        ranks = []
        for rank in (0, 1):
            local = run(streamed(str(shards / NAMES)), tokenizer, rank=rank, world_size=2, epoch=epoch)
            http = run(streamed(f"{url}/{NAMES}"), tokenizer, rank=rank, world_size=2, epoch=epoch)
            same(http, local)  # the same batches, tensors included
            ranks.append(keys(http))
        assert len(ranks[0]) == len(ranks[1]) == SHARDS * PER // 2
        assert sorted(ranks[0] + ranks[1]) == KEYS  # every sample once over the two ranks
        assert fetched == {f"/llava-{s:06d}.tar": 1 for s in range(SHARDS)}  # each shard fetched once per epoch
    fetched.clear()
    local = run(streamed(str(shards / NAMES)), tokenizer, rank=1, world_size=2, epoch=1)
    same(run(streamed(f"{url}/{NAMES}", num_workers=2), tokenizer, rank=1, world_size=2, epoch=1), local)
    assert set(fetched.values()) == {2} and len(fetched) == SHARDS // 2  # each worker streams all of its rank's shards


@needs_curl
def test_a_resumed_stream_continues_at_the_same_sample(shards, server, tokenizer):
    url, _ = server
    cfg = streamed(f"{url}/{NAMES}")
    full = run(cfg, tokenizer, rank=1, world_size=2, epoch=2)
    assert len(full) == 8  # 15 samples in batches of 2
    for n in range(len(full) + 1):
        same(run(cfg, tokenizer, rank=1, world_size=2, epoch=2, skip_batches=n), full[n:])
    two = streamed(f"{url}/{NAMES}", num_workers=2)
    for n in (3, 5):
        same(run(two, tokenizer, rank=1, world_size=2, epoch=2, skip_batches=n), full[n:])


@needs_curl
def test_pipe_commands_read_as_the_files_they_print(shards, server, tokenizer):
    url, _ = server
    local = run(streamed(str(shards / NAMES)), tokenizer, epoch=1)
    same(run(streamed(f"pipe:cat {shards}/{NAMES}"), tokenizer, epoch=1), local)
    same(run(streamed(f"pipe:curl -sSfL {url}/{NAMES}"), tokenizer, epoch=1), local)
    assert sorted(keys(local)) == KEYS


@needs_curl
def test_a_shard_that_cannot_be_fetched_is_one_error_naming_it(shards, server, tokenizer):
    url, _ = server
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/llava-000000.tar"
    missing = f"{url}/llava-000009.tar"
    cases = [
        (dead, rf"^cannot read the shard {dead}: `curl -sSfgL .* {dead}` exited with status 7: curl: \(7\) Failed"),
        (missing, rf"^cannot read the shard {missing}: `curl .*` exited with status 22: curl: \(22\) .*404"),
    ]
    for shard, message in cases:
        for workers in (0, 2):
            with pytest.raises(UnreadableShard, match=message) as e:
                run(streamed([str(shards / "llava-000001.tar"), shard], num_workers=workers), tokenizer)
            assert "\n" not in str(e.value) and "Traceback" not in str(e.value)  # not a worker's traceback
            assert cli.expected(e.value) and cli.message(e.value) == str(e.value)  # the command's one-line error
            assert str(e.value).endswith("; make it readable, then resume the run (train.resume=auto)")

    # the tar is whole but its command fails: its last sample is held back until the command's end, then lost
    command = f"pipe:cat {shards}/llava-000002.tar; exit 3"
    got, reader = [], ShardReader(ShardSource(path=command))
    with pytest.raises(UnreadableShard, match=r"`cat .*llava-000002.tar; exit 3` exited with status 3; make"):
        for sample in reader.samples(command, Counter()):
            got.append(sample["__key__"])
    assert got == KEYS[2 * PER : 3 * PER - 1]

    # a download that breaks off inside a member (a reset connection): the same error, the rest of the shard unread
    with tarfile.open(shards / "llava-000004.tar") as tar:
        image = tar.getmember(f"{KEYS[4 * PER + 2]}.jpg")
    command = f"pipe:head -c {image.offset_data + image.size // 2} {shards}/llava-000004.tar; exit 56"
    got, reader = [], ShardReader(ShardSource(path=command))
    with pytest.raises(UnreadableShard) as e:
        for sample in reader.samples(command, Counter()):
            got.append(sample["__key__"])
    said = f"cannot read the shard {command}: `{command[5:]}` exited with status 56; make it readable, then resume"
    assert str(e.value) == said + " the run (train.resume=auto)"
    assert got == KEYS[4 * PER : 4 * PER + 1]  # the sample before the cut one is grouped only once the next starts


def test_a_reader_stopped_early_stops_its_command(shards):
    """A consumer that takes one sample (train.py's show_example) or ends its epoch early leaves nothing running:
    closing the reader kills the command's whole process group instead of waiting for it."""
    command = f"pipe:cat {shards}/llava-000000.tar; sleep 60"
    reader = ShardReader(ShardSource(path=command))
    start = time.perf_counter()
    samples = reader.samples(command, Counter())
    assert next(samples)["__key__"] == KEYS[0]
    samples.close()
    assert time.perf_counter() - start < 10


@needs_curl
def test_a_corrupt_streamed_shard_is_skipped_and_counted_as_the_same_local_file(shards, server, tokenizer):
    url, _ = server
    with tarfile.open(shards / "llava-000003.tar") as tar:
        image = tar.getmember(f"{KEYS[3 * PER + 2]}.jpg")
    cut = (shards / "llava-000003.tar").read_bytes()[: image.offset_data + image.size // 2]
    (shards / "cut.tar").write_bytes(cut)  # cut inside the third sample's image: curl itself succeeds
    local = run(streamed([str(shards / "llava-000000.tar"), str(shards / "cut.tar")]), tokenizer)
    assert sum(b["skipped"].get("bad_shard", 0) for b in local) == 1
    assert sorted(keys(local)) == KEYS[:PER] + [KEYS[3 * PER]]  # the rest is lost, its whole second sample too
    same(run(streamed([f"{url}/llava-000000.tar", f"{url}/cut.tar"]), tokenizer), local)
    same(run(streamed([f"pipe:cat {shards}/llava-000000.tar", f"pipe:cat {shards}/cut.tar"]), tokenizer), local)


def test_store_urls_go_through_their_cli_or_fail_at_once_saying_how_to_pipe(shards, tmp_path, monkeypatch, tokenizer):
    assert expand_shards("https://host/a-{0..2}.tar", must_exist=True) == [f"https://host/a-{i}.tar" for i in range(3)]
    assert shard_command(str(shards / "llava-000000.tar")) is None and shard_command("file:///x.tar") is None
    assert shard_command("pipe:cat 'a b.tar'") == "cat 'a b.tar'"
    with pytest.raises(ConfigError, match=r"^cannot stream the shard ftp://host/a.tar: ftp:// has no reader here"):
        data.SourceDataset(config("ftp://host/a.tar"), None)
    with pytest.raises(ConfigError, match=r"names no command: write 'pipe:COMMAND'"):
        data.SourceDataset(config("pipe: "), None)

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ConfigError, match=r"^cannot stream the shard s3://bucket/llava-000000.tar: s3:// shards are "
                                          r"read with `aws s3 cp URL -` and `aws` is not on PATH: install it, or name "
                                          r"the shard as 'pipe:COMMAND'"):  # fmt: skip
        data.SourceDataset(config(f"s3://bucket/{NAMES}"), None)

    # a stand-in for the AWS CLI (S3 is out of reach here): it serves `aws s3 cp s3://bucket/KEY -` from the folder
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(
        f'#!/bin/sh\n[ "$1 $2 $4" = "s3 cp -" ] || exit 2\nexec cat "{shards}/${{3#s3://bucket/}}"\n'
    )
    (bin_dir / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert shard_command("s3://bucket/a b.tar") == "aws s3 cp 's3://bucket/a b.tar' -"
    same(run(streamed(f"s3://bucket/{NAMES}"), tokenizer), run(streamed(str(shards / NAMES)), tokenizer))
    with pytest.raises(UnreadableShard, match=r"`aws s3 cp s3://bucket/gone.tar -` exited with status 1: cat: .*gone"):
        run(streamed("s3://bucket/gone.tar"), tokenizer)
