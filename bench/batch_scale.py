"""`vidsparse batch` on a huge questions file, fresh and resumed: time to the first answer, memory, and
the answering rate, measured on the real command (a subprocess) with the shipped demo model.

Rows, side by side in one run:
- `fresh`: a questions file of --questions questions (default a million; one ShapesQA clip and
  question under distinct ids); the run is stopped (SIGINT, as Ctrl-C) after --answers answers;
- `resumed`: the same command on a results file that already holds --recorded records (default
  300,000, about 1.2 kB each, as real records are), then --answers new answers.

Columns: seconds from the command's start to its first new record (torch import and model load
included); resident memory (RSS) after a fifth of --answers new records and after all of them, and
the growth between the two per answer; answers a second between those two points, and that rate as a
share of the fresh run's (a resume should answer as fast as a fresh run). Memory is read from /proc
(Linux).

    python bench/batch_scale.py                                  # 1,000,000 questions, 300,000 recorded
    python bench/batch_scale.py --questions 100000 --recorded 30000 --answers 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vidsparse.datasets.shapes import make_shapes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_records(path: Path, start: int) -> int:
    """Records written after byte `start` (complete lines)."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        f.seek(start)
        return f.read().count(b"\n")


def run(command: list[str], out: Path, answers: int, timeout_s: float) -> dict[str, float]:
    """Start `command`; time its first new record, read its memory then and after `answers` records; stop it."""
    start_bytes = out.stat().st_size if out.exists() else 0
    # The results file's header is the first line of a new file: it is no answer.
    header = 0 if start_bytes else 1
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first_s = early = None
    warm = max(answers // 5, 1)  # memory is compared from here on: the first answers warm the allocator up
    deadline = started + timeout_s
    try:
        while time.perf_counter() < deadline and process.poll() is None:
            done = count_records(out, start_bytes) - header
            if first_s is None and done >= 1:
                first_s = time.perf_counter() - started
            if early is None and done >= warm:
                early = (rss_mb(process.pid), time.perf_counter(), done)
            if done >= answers:
                late = (rss_mb(process.pid), time.perf_counter(), done)
                break
            time.sleep(0.02)
        else:
            raise SystemExit(f"the run did not reach {answers} answers in {timeout_s:.0f} s (exit {process.poll()})")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    return {"first_s": first_s, "early_rss": early[0], "late_rss": late[0],
            "growth_kb": (late[0] - early[0]) * 1024 / (late[2] - early[2]),
            "rate": (late[2] - early[2]) / (late[1] - early[1])}


def write_questions(root: Path, n: int) -> Path:
    """`n` questions (ids q0, q1, ...), each the first clip's own question: every answer then costs the
    same, so the fresh and resumed rates compare the batch's own overheads, not two workloads."""
    item = json.loads((root / "qa.jsonl").read_text().splitlines()[0])
    path = root / "many.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"video": item["video"], "question": item["question"], "answer": item["answer"],
                                "type": item["type"], "id": f"q{i}"}) + "\n")
    return path


def write_recorded(questions: Path, template: dict, out: Path, n: int) -> None:
    """A results file holding the first `n` questions' records, each a copy of a real record."""
    with questions.open() as q, out.open("a") as f:
        for _, line in zip(range(n), q, strict=False):
            item = json.loads(line)
            f.write(json.dumps(template | {"id": item["id"], "video": item["video"], "question": item["question"],
                                           "type": item["type"], "reference": item["answer"]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=1_000_000, help="questions in the file")
    parser.add_argument("--recorded", type=int, default=300_000, help="records already in the resumed file")
    parser.add_argument("--answers", type=int, default=3000, help="answers timed in each run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; shapes-demo model, "
          "--method sparsevlm --budget 25%, float32 (auto on a CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "clips"
        make_shapes(root, 1, seed=5)
        questions = write_questions(root, args.questions)
        print(f"questions file: {args.questions:,} questions, {questions.stat().st_size / 2**20:,.0f} MiB")

        def command(out: Path) -> list[str]:
            return [sys.executable, "-m", "vidsparse", "batch", str(root), "--questions", str(questions), "--out",
                    str(out), "--model", "shapes-demo", "--method", "sparsevlm", "--budget", "25%",
                    "--max-new-tokens", "4"]

        fresh_out = Path(tmp) / "fresh.jsonl"
        fresh = run(command(fresh_out), fresh_out, args.answers, args.timeout)
        lines = fresh_out.read_text().splitlines()
        resumed_out = Path(tmp) / "resumed.jsonl"
        resumed_out.write_text(lines[0] + "\n")
        write_recorded(questions, json.loads(lines[1]), resumed_out, args.recorded)
        print(f"resumed file: {args.recorded:,} records, {resumed_out.stat().st_size / 2**20:,.0f} MiB")
        resumed = run(command(resumed_out), resumed_out, args.answers, args.timeout)

    print(f"{'':9s} {'first answer s':>14s} {'RSS early MB':>12s} {'RSS late MB':>11s} {'kB/answer':>9s} "
          f"{'answers/s':>9s} {'vs fresh':>8s}")
    for name, row in (("fresh", fresh), ("resumed", resumed)):
        print(f"{name:9s} {row['first_s']:14.1f} {row['early_rss']:12.0f} {row['late_rss']:11.0f} "
              f"{row['growth_kb']:9.2f} {row['rate']:9.1f} {row['rate'] / fresh['rate']:7.2f}x")


if __name__ == "__main__":
    main()
