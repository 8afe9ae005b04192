"""Several nodes: two separate `torchrun --nnodes 2 --nproc-per-node 1` launches meeting at a c10d rendezvous on the
loopback train the tiny foveated model (FSDP, fp32, gloo) to the same losses and weights as one
`torchrun --nnodes 1 --nproc-per-node 2` launch. Each node's torchrun is the command a user runs on each machine
(docs/training.md), with OMP_NUM_THREADS=1 (SINGLE_THREAD). c10d numbers the nodes in the order they join
(torchrun's --node-rank is for its static rendezvous only); the run does not depend on which is which."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_train import REPO, SINGLE_THREAD, config_yaml, losses, make_config, write_sized_shards
from vlm import saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nnodes: int, nproc: int, port: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex,
            "train.py", "--config", str(config)]  # fmt: skip


def run(tmp: Path, start: Path, name: str, nodes: int) -> float:
    """Train with 2 processes: on one node, or as `nodes` = 2 launches of one process each; the seconds it took."""
    data = {"train": write_sized_shards(tmp, [3, 7, 2, 5, 4]), "batch_size": 2}
    opts = {"max_steps": 4, "accumulate": 1, "save_every": 4, "bf16": False, "parallel": "fsdp"}
    config = tmp / f"{name}.yaml"
    config.write_text(config_yaml(make_config(tmp, start, name, data=data, train=opts)))
    port, began = free_port(), time.perf_counter()
    cmd = torchrun(nodes, 2 // nodes, port, config)
    logs = [tmp / f"{name}-node{i}.log" for i in range(nodes)]  # files: a full pipe would stall a node
    files = [log.open("w") for log in logs]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=SINGLE_THREAD, stdout=f, stderr=subprocess.STDOUT) for f in files]
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p, f in zip(procs, files, strict=True):
            p.kill()
            f.close()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log.read_text()[-3000:]
    return time.perf_counter() - began


def test_two_nodes_train_as_one_node_with_two_processes(tmp_path, start_model):
    one = run(tmp_path, start_model, "one", nodes=1)
    two = run(tmp_path, start_model, "two", nodes=2)
    assert losses(tmp_path / "two") == losses(tmp_path / "one")  # digit for digit
    a, b = (load_file(str(tmp_path / name / "final" / saved.WEIGHTS)) for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"one node: {one:.1f} s, two nodes: {two:.1f} s")
