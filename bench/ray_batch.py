"""Questions/s of `vidsparse batch` in one process and on 1 and 2 Ray workers, side by side in one run.

The workload: ShapesQA clips (the shipped demo model) with every question type plus two more
questions a clip, answered with --method sparsevlm --budget 25%. Each Ray row starts the workers
(model loaded on each) before its clock starts, then times the whole run through the driver (results
file written, fsync per answer); start-up is printed apart. Answers are checked against the
single-process run. On a CPU machine, N CPU workers share its cores (torch threads = cores / N).

    python bench/ray_batch.py                 # 24 clips x 3 questions
    python bench/ray_batch.py --clips 60 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from transformers.utils import logging as hf_logging

from vidsparse.batch import batch_settings, clip_jobs, run_batch
from vidsparse.datasets.shapes import make_shapes
from vidsparse.metrics import Tally
from vidsparse.options import DECODE_BATCH, ask_options
from vidsparse.pipeline import VideoQA
from vidsparse.questions import load_questions
from vidsparse.ray_batch import LOCAL, WorkerPool
from vidsparse.results import ResultsFile

MODEL = "shapes-demo"
EXTRA = ["how many objects are there ?", "describe the objects ?"]


def workload(root: Path, clips: int) -> Path:
    make_shapes(root, clips, seed=99)
    lines = [json.loads(line) for line in (root / "qa.jsonl").read_text().splitlines()]
    more = [{"video": x["video"], "question": q, "id": f"{x['id']}-{i}"} for x in lines for i, q in enumerate(EXTRA)]
    (root / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines + more))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = ap.parse_args()
    options = ask_options("sparsevlm", "25%", None, "keep", 0, 0, 8, "auto", 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = workload(Path(tmp) / "clips", args.clips)
        questions = load_questions(root, root / "qa.jsonl", None)
        settings = batch_settings(MODEL, "float32", "cpu", options)
        print(f"{len(questions)} questions on {args.clips} clips, {os.cpu_count()} CPU cores, sparsevlm 25%, "
              "dtype float32 (the shipped demo model's)")

        hf_logging.disable_progress_bar()
        qa = VideoQA.from_pretrained(MODEL, dtype="float32", device="cpu")
        torch.set_num_threads(os.cpu_count())
        with ResultsFile.open(Path(tmp) / "single.jsonl", settings) as results:
            started = time.perf_counter()
            run_batch(qa, clip_jobs(questions), root, results, options, Tally(), decode_batch=DECODE_BATCH)
            single_s = time.perf_counter() - started
            reference = {r["id"]: r.get("answer") for r in results.latest_records()}
        rows = [("one process", 0.0, single_s, True)]

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        for n in map(int, args.workers.split(",")):
            started = time.perf_counter()
            with WorkerPool.start(LOCAL, n, MODEL, "float32", "cpu") as pool:
                assert pool.settings(options) == settings
                startup = time.perf_counter() - started
                with ResultsFile.open(Path(tmp) / f"ray{n}.jsonl", settings) as results:
                    started = time.perf_counter()
                    pool.run(clip_jobs(questions), root, results, options, Tally(), lambda: None, DECODE_BATCH)
                    seconds = time.perf_counter() - started
                    same = {r["id"]: r.get("answer") for r in results.latest_records()} == reference
            rows.append((f"ray, {n} worker(s)", startup, seconds, same))
        ray.shutdown()

    print(f"{'':20s} {'start-up s':>10s} {'run s':>7s} {'q/s':>7s} {'vs one process':>15s} {'same answers':>13s}")
    for name, startup, seconds, same in rows:
        print(f"{name:20s} {startup:10.1f} {seconds:7.2f} {len(questions) / seconds:7.2f} "
              f"{single_s / seconds:14.2f}x {str(same):>13s}")


if __name__ == "__main__":
    main()
