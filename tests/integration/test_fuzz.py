"""Damaged copies of a real clip, fed to `ask` and `batch` with the shipped model: every copy is
answered or refused in one line; nothing raises a traceback, nothing hangs."""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from vidsparse.cli import app
from vidsparse.datasets import make_shapes

ASK_SECONDS = 60  # far above a normal answer (well under a second): more means a hang


def _flip_bits(data: bytes, seed: int, count: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for position in rng.integers(0, len(out), count):
        out[position] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _garble_box(data: bytes, box: bytes, seed: int, length: int = 24) -> bytes:
    """Random bytes over the first `length` bytes of an MP4 box's payload (its table or its text)."""
    start = data.find(box)
    if start < 0:
        return data
    noise = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    return data[: start + 4] + noise + data[start + 4 + length :]


def damaged_copies(clip: bytes) -> dict[str, bytes]:
    copies = {f"truncated-{int(f * 100)}": clip[: int(len(clip) * f)] for f in (0.05, 0.2, 0.5, 0.8, 0.97)}
    copies |= {f"bitflip-{seed}": _flip_bits(clip, seed) for seed in range(6)}
    copies |= {
        "header-zeroed": bytes(32) + clip[32:],
        "header-no-ftyp": clip.replace(b"ftyp", b"xxxx", 1),
        "header-no-moov": clip.replace(b"moov", b"moox", 1),
        "header-no-mdat": clip.replace(b"mdat", b"mdaX", 1),
        "header-sample-sizes": _garble_box(clip, b"stsz", 1),
        "header-chunk-offsets": _garble_box(clip, b"stco", 2),
        "header-timing": _garble_box(clip, b"stts", 3),
        "metadata-garbled": _garble_box(clip, b"udta", 4, 40),
        "metadata-handler": _garble_box(clip, b"hdlr", 5, 40),
        "metadata-not-utf8": clip.replace(b"Lavf", b"\xff\xfe\xfd\xfc"),  # the encoder tag's text
    }
    return copies


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A folder of damaged copies of one ShapesQA clip, the intact clip, and a qa.jsonl over them."""
    source = tmp_path_factory.mktemp("shapes")
    qa = json.loads(make_shapes(source, 1, seed=99).read_text().splitlines()[0])
    clip = (source / qa["video"]).read_bytes()
    folder = tmp_path_factory.mktemp("damaged")
    copies = {"intact": clip, **damaged_copies(clip)}
    for name, data in copies.items():
        (folder / f"{name}.mp4").write_bytes(data)
    items = [{"video": f"{name}.mp4", "question": qa["question"], "id": name} for name in copies]
    (folder / "qa.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return folder, qa["question"], list(copies)


@pytest.fixture
def no_hang():
    """Abort the whole run (with every thread's stack) if one call takes far too long, even inside C code."""
    faulthandler.dump_traceback_later(ASK_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def no_constants(name):
    raise AssertionError(f"{name} in --json output: not valid JSON")


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_ask_answers_or_refuses_every_damaged_copy(damaged, no_hang, backend):
    folder, question, names = damaged
    runner = CliRunner()
    outcomes = {}
    for name in names:
        result = runner.invoke(app, ["ask", str(folder / f"{name}.mp4"), question, "--model", "shapes-demo", "--json",
                                     "--method", "sparsevlm", "--budget", "25%", "--max-new-tokens", "3",
                                     "--backend", backend])
        assert result.exception is None or isinstance(result.exception, SystemExit), (name, result.exception)
        assert result.exit_code in (0, 2), (name, result.output)
        if result.exit_code == 0:
            json.loads(result.stdout, parse_constant=no_constants)
        else:
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (name, result.stderr)
        outcomes[name] = result.exit_code
    assert outcomes["intact"] == outcomes["metadata-not-utf8"] == 0 and outcomes["header-zeroed"] == 2
    assert sum(code == 2 for code in outcomes.values()) >= 5  # the copies really are damaged


def test_batch_over_damaged_copies_records_each_and_finishes(damaged, tmp_path):
    folder, _, names = damaged
    out = tmp_path / "results.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "vidsparse", "batch", str(folder), "--questions", str(folder / "qa.jsonl"), "--out",
         str(out), "--model", "shapes-demo", "--method", "fastv", "--budget", "10%", "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr  # some copies fail, none crash
    records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in records) == sorted(names)
    by_id = {r["id"]: r for r in records}
    assert "error" not in by_id["intact"] and isinstance(by_id["header-zeroed"]["error"], str)
