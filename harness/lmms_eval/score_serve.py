"""lmms-eval scores `vidsparse serve` on ShapesQA, and the score is checked against `vidsparse batch`.

    harness/lmms_eval/setup.sh                               # once: lmms-eval 0.7.3 in .lmms-venv
    python harness/lmms_eval/score_serve.py                  # 100 held-out questions, shapes-demo, no pruning
    python harness/lmms_eval/score_serve.py --method stprune --budget 5% --mode simple

Steps: write ShapesQA clips (the held-out seed), answer them with `vidsparse batch`, start `vidsparse
serve` with the same model and pruning on a free port, run lmms-eval's `openai` model against it on a
local task (harness/lmms_eval/shapesqa.yaml), read the score from lmms-eval's results JSON (it exits 0
even when the evaluation crashed) and compare it, and every answer, with batch's. `--mode video_url`
sends each clip as one file:// video_url part (lmms-eval's pass_video_url=True); `--mode simple` as the
clip's frames, PNG image_url parts after the text (--force_simple). Exits 1 if an answer differs or a
request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FRAMES = 8  # ShapesQA clips have 8 frames: both batch and lmms-eval see all of them
NEW_TOKENS = 16  # the task's max_new_tokens


def run(command: list[str], **kwargs) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, root: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "vidsparse", "serve", "--model", args.model, "--method", args.method,
               "--budget", args.budget, "--frames", str(FRAMES), "--max-new-tokens", str(NEW_TOKENS),
               "--media-root", str(root), "--port", str(port), "--queue-size", "64"]
    print("$ " + " ".join(command), flush=True)
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start")


def task_files(qa_file: Path, out: Path) -> Path:
    """The task's data (absolute clip paths) and its YAML under `out`; the YAML's folder."""
    rows = [json.loads(line) for line in qa_file.read_text().splitlines() if line.strip()]
    data = out / "shapesqa.jsonl"
    data.write_text("".join(json.dumps({**row, "video": str((qa_file.parent / row["video"]).resolve())}) + "\n"
                            for row in rows))
    task = out / "task"
    task.mkdir(exist_ok=True)
    (task / "shapesqa.yaml").write_text((HERE / "shapesqa.yaml").read_text().replace("DATA_FILE", str(data)))
    return task


def lmms_eval(args, task: Path, out: Path, port: int) -> tuple[dict, list[dict]]:
    """lmms-eval's results JSON and its samples (one per question, in the data's order)."""
    model_args = f"model={args.model},max_frames_num={FRAMES},num_concurrent={args.concurrency},max_retries=2"
    extra = ["--force_simple"] if args.mode == "simple" else []
    if args.mode == "video_url":
        model_args += ",pass_video_url=True"
    results = out / "lmms-results"
    env = {**os.environ, "OPENAI_API_BASE": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": "local",
           "HF_HUB_OFFLINE": "1"}
    command = [str(args.venv / "bin" / "lmms-eval"), "eval", "--model", "openai", "--model_args", model_args,
               "--tasks", "shapesqa", "--include_path", str(task), "--batch_size", "1", "--log_samples",
               "--output_path", str(results), *extra]
    print("$ " + " ".join(command), flush=True)
    with open(out / "lmms_eval.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    found = sorted(results.glob("*/*_results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"lmms-eval wrote no results (see {out / 'lmms_eval.log'})")
    samples = sorted(found[-1].parent.glob("*_samples_shapesqa.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    return json.loads(found[-1].read_text()), sorted(rows, key=lambda r: r["doc_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".lmms-venv", help="where setup.sh put lmms-eval")
    parser.add_argument("--model", default="shapes-demo")
    parser.add_argument("--method", default="none")
    parser.add_argument("--budget", default="194")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=424242, help="the ShapesQA held-out seed")
    parser.add_argument("--mode", choices=["video_url", "simple"], default="video_url")
    parser.add_argument("--concurrency", type=int, default=4, help="lmms-eval's num_concurrent")
    parser.add_argument("--out", type=Path, default=Path("lmms-eval-run"))
    args = parser.parse_args()
    if not (args.venv / "bin" / "lmms-eval").exists():
        raise SystemExit(f"no lmms-eval in {args.venv}: run harness/lmms_eval/setup.sh first")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clips = out / "shapes"
    if not (clips / "qa.jsonl").exists():
        run([sys.executable, "-m", "vidsparse", "make-shapes", str(clips), "--n", str(args.n), "--seed",
             str(args.seed)])
    batch = out / f"batch-{args.method}-{args.budget.replace('%', 'pct')}.jsonl"
    run([sys.executable, "-m", "vidsparse", "batch", str(clips), "--questions", str(clips / "qa.jsonl"), "--out",
         str(batch), "--model", args.model, "--method", args.method, "--budget", args.budget, "--frames", str(FRAMES),
         "--max-new-tokens", str(NEW_TOKENS)], stdout=subprocess.DEVNULL)
    by_id = {r["id"]: r for r in map(json.loads, batch.read_text().splitlines()) if "id" in r}  # (line 1: the header)
    questions = [json.loads(line) for line in (clips / "qa.jsonl").read_text().splitlines()]
    expected = [by_id[q["id"]]["answer"] for q in questions]
    port = free_port()
    server = start_server(args, clips, port)
    try:
        results, samples = lmms_eval(args, task_files(clips / "qa.jsonl", out), out, port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    served = [s["filtered_resps"] for s in samples]
    failed = sum(str(a).startswith("[LMMS_EVAL_REQUEST_FAILED") for a in served)
    batch_accuracy = sum(a.strip().lower() == q["answer"] for a, q in zip(expected, questions, strict=True))
    score = results["results"]["shapesqa"]["exact_match,none"]
    same = sum(a == b for a, b in zip(served, expected, strict=True))
    print(f"\nlmms-eval {args.mode}: exact_match {score:.4f} on {len(samples)} questions ({failed} failed requests)")
    print(f"vidsparse batch:      accuracy    {batch_accuracy / len(questions):.4f}")
    print(f"identical answers:    {same}/{len(questions)}  ({args.model}, {args.method}"
          f"{'' if args.method == 'none' else ' at ' + args.budget})")
    sys.exit(0 if same == len(questions) and not failed else 1)


if __name__ == "__main__":
    main()
