"""Per-type accuracy of pruning runs on in-memory ShapesQA clips: what the object oracle and the
stprune ablation share. Clips are rendered, not read from mp4 files, so a run reads within a few
questions of `vidsparse sweep` on the same seed's folder (no codec loss)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from unittest import mock

import numpy as np

from lab.yardsticks import YARDSTICKS, Yardstick
from vidsparse.answer import AskResult
from vidsparse.metrics import is_correct
from vidsparse.options import AskOptions, parse_budget
from vidsparse.pipeline import VideoQA
from vidsparse.pruning import METHODS

MODELS = {"demo": "shapes-demo", "hd": "shapes-hd"}
TUNING_SEEDS = {"demo": 777, "hd": 515151}  # the seeds every earlier ablation was measured on


@dataclass(frozen=True)
class Run:
    label: str
    method: str
    budget: str
    settings: dict = field(default_factory=dict)  # constants of the method's module, set for this run only


def ask_run(qa: VideoQA, run: Run, frames: object, question: str, positions: str = "authors") -> AskResult:
    """One run's answer to one question, its settings set on its method's module for this call only."""
    module = sys.modules[METHODS[run.method].__module__]
    with mock.patch.multiple(module, **run.settings) if run.settings else nullcontext():
        return qa.answer(frames, question, AskOptions(run.method, parse_budget(run.budget), positions=positions,
                                                      max_new_tokens=8))


def per_type_accuracy(qa: VideoQA, data: ModuleType, n: int, seed: int, runs: list[Run],
                      on_clip: Callable[[object], None] = lambda clip: None,
                      ask: Callable[[Run, object, str], AskResult] | None = None) -> list[dict]:
    """Question i asks type i mod len(types) about ``data.sample(default_rng([seed, i]))``; each run
    answers every question (`ask`, by default `ask_run`). Rows: label, method, budget, overall, prefill
    FLOPs share, one per type."""
    ask = ask or (lambda run, frames, question: ask_run(qa, run, frames, question))
    correct: dict[int, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    flops: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i in range(n):
        qtype = data.QUESTION_TYPES[i % len(data.QUESTION_TYPES)]
        clip, question, answer = data.sample(np.random.default_rng([seed, i]), qtype)
        on_clip(clip)
        for k, run in enumerate(runs):
            result = ask(run, clip.frames, question)
            correct[k][qtype].append(is_correct(result.answer, answer))
            flops[k][0] += result.prefill_flops
            flops[k][1] += result.prefill_flops_unpruned
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{n} questions", flush=True)
    return [{"label": run.label, "method": run.method, "budget": run.budget,
             "overall": float(np.mean(sum(correct[k].values(), []))),
             "prefill_flops_share": flops[k][0] / flops[k][1],
             **{t: float(np.mean(v)) for t, v in correct[k].items()}} for k, run in enumerate(runs)]


def tuning_arguments(doc: str, n: int) -> argparse.ArgumentParser:
    """The options of a run on a yardstick's tuning clips: --yardstick, --n, --seed, --budget, --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yardstick", choices=sorted(MODELS), default="hd")
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--seed", type=int, default=None, help="default: the yardstick's tuning seed (777, 515151)")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--out", type=Path, default=None, help="default: under lab/results, named for the yardstick")
    return parser


def tuning_setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Yardstick, int, VideoQA]:
    """The yardstick, its tuning seed (never the held-out set's) and its shipped model in float32."""
    yardstick = YARDSTICKS[args.yardstick]
    seed = TUNING_SEEDS[args.yardstick] if args.seed is None else args.seed
    if seed == yardstick.eval_seed:
        parser.error(f"seed {seed} is the held-out set's: tuning runs use another seed")
    return yardstick, seed, VideoQA.from_pretrained(MODELS[args.yardstick], dtype="float32", device="cpu")


def save_rows(args: argparse.Namespace, seed: int, rows: list[dict], name: str) -> Path:
    """Write a tuning run's rows with its settings to --out (default lab/results/<name>_<yardstick>.json)."""
    out = args.out or Path(f"lab/results/{name}_{args.yardstick}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"yardstick": args.yardstick, "n": args.n, "seed": seed, "budget": args.budget,
                               "rows": rows}, indent=1) + "\n")
    return out


def print_table(rows: list[dict], types: tuple[str, ...]) -> None:
    print("| run | budget | prefill FLOPs | overall | " + " | ".join(types) + " |")
    print("|---|---|---|---|" + "---|" * len(types))
    for row in rows:
        print(f"| {row['label']} | {row['budget']} | {row['prefill_flops_share']:.1%} | {row['overall']:.3f} | "
              + " | ".join(f"{row[t]:.2f}" for t in types) + " |")
