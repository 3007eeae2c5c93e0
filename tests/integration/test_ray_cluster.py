"""`vidsparse batch --ray ADDRESS` joins a Ray cluster that is already running (started with `ray
start --head`, as on a real cluster), by its GCS address and through Ray Client (`ray://`), and
answers as the single-process batch does. Apart from test_ray_batch.py: `ray stop` ends every Ray
process of the machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from vidsparse.datasets.shapes import make_shapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    gcs, client = free_port(), free_port()
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray, "start", "--head", "--num-cpus", "2", "--port", str(gcs), "--ray-client-server-port",
                    str(client), "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120)
    yield gcs, client
    subprocess.run([*ray, "stop", "--force"], capture_output=True, timeout=120, check=False)


def answers(path) -> dict[str, str]:
    return {r["id"]: r.get("answer") for r in map(json.loads, path.read_text().splitlines()[1:])}


def test_joins_a_running_cluster(head, tmp_path):
    gcs, client = head
    clips = tmp_path / "clips"
    make_shapes(clips, 4, seed=12)
    base = [sys.executable, "-m", "vidsparse", "batch", str(clips), "--questions", str(clips / "qa.jsonl"),
            "--model", "shapes-demo", "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([*base, "--out", str(tmp_path / "one.jsonl")], check=True, env=env, timeout=300,
                   capture_output=True)
    # Ray >= 2.59 starts clusters with token authentication; a driver given an address must say so.
    token = {"RAY_AUTH_MODE": "token"}
    for name, address in [("gcs", f"127.0.0.1:{gcs}"), ("client", f"ray://127.0.0.1:{client}")]:
        out = tmp_path / f"{name}.jsonl"
        done = subprocess.run([*base, "--out", str(out), "--ray", address, "--workers", "2"], env=env | token,
                              timeout=300, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
        assert answers(out) == answers(tmp_path / "one.jsonl") and len(records) == 4
        assert {r["worker"]["index"] for r in records} <= {0, 1}
