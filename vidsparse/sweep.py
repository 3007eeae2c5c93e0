"""`vidsparse sweep`: accuracy, latency and memory for every method x budget on the same clips.

Timings are fair to every cell: one warm-up run first, then the cells interleaved (A, B, C, A,
B, C, ...) `repeats` times per question, and the median taken, so machine drift favours nobody.
`none` does not depend on the budget and is one cell, the reference for speedups.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vidsparse.batch import AskOptions
from vidsparse.errors import UserError
from vidsparse.metrics import is_correct
from vidsparse.pipeline import AskResult, VideoQA
from vidsparse.pruning import METHODS, check_options, make_plan, resolve_budget
from vidsparse.questions import Question
from vidsparse.video import DecodedVideo, decode_video


@dataclass
class Cell:
    method: str
    budget: str  # as the user wrote it ("-" for none)
    answers: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    types: list[str] = field(default_factory=list)  # question type of each graded answer
    agrees: list[bool] = field(default_factory=list)  # same answer as `none`
    visual_tokens: list[int] = field(default_factory=list)
    equivalent: list[float] = field(default_factory=list)
    flops: list[int] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)  # per question, the median over repeats
    total_ms: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    first_result: AskResult | None = None

    def row(self, reference: Cell | None) -> dict[str, Any]:
        mean = statistics.fmean
        prefill, total = mean(self.prefill_ms), mean(self.total_ms)
        by_type = {t: round(mean(c for c, ct in zip(self.correct, self.types, strict=True) if ct == t), 4)
                   for t in sorted(set(self.types)) if t}
        return {
            "method": self.method,
            "budget": self.budget,
            "visual_tokens": round(mean(self.visual_tokens), 1),
            "answer": self.answers[0] if len(self.answers) == 1 else None,
            "accuracy": round(mean(self.correct), 4) if self.correct else None,
            "agreement_with_none": round(mean(self.agrees), 4) if self.agrees else None,
            "equivalent_tokens": round(mean(self.equivalent), 1),
            "prefill_tflops": round(mean(self.flops) / 1e12, 6),
            "prefill_ms": round(prefill, 2),
            "total_ms": round(total, 2),
            "peak_mb": round(max(self.peak_bytes) / 2**20, 1) if self.peak_bytes else None,
            "prefill_speedup": round(mean(reference.prefill_ms) / prefill, 3) if reference else None,
            "total_speedup": round(mean(reference.total_ms) / total, 3) if reference else None,
            **{f"accuracy_{t}": acc for t, acc in by_type.items()},
        }


def sweep_cells(methods: list[str], budgets: list[str], options: AskOptions) -> list[Cell]:
    """One cell for `none`, one per other method x budget; every cell's options checked up front."""
    if not methods or not budgets:
        raise UserError("--methods and --budgets need at least one value each")
    cells = [Cell("none", "-")] if "none" in methods else []
    cells += [Cell(m, b) for m in dict.fromkeys(methods) if m != "none" for b in budgets]
    for cell in cells:
        o = options_for(cell, options) if cell.method in METHODS else replace(options, method=cell.method)
        check_options(o.method, o.budget, prune_after=o.prune_after, positions=o.positions,
                      min_per_frame=o.min_per_frame)
    return cells


def run_sweep(qa: VideoQA, questions: list[Question], cells: list[Cell], options: AskOptions, repeats: int,
              on_step: Callable[[], None] = lambda: None) -> list[Cell]:
    """Fill every cell with every question's answer and median timings."""
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    num_visual = options.num_frames * qa.model.tokens_per_frame
    for cell in cells:  # fail before the first run, not in the middle of the sweep
        o = options_for(cell, options)
        make_plan(o.method, resolve_budget(o.budget, num_visual), len(qa.model.decoder.layers),
                  prune_after=o.prune_after, positions=o.positions, min_per_frame=o.min_per_frame,
                  clip=(options.num_frames, num_visual))
    cell_options = [asdict(options_for(c, options)) for c in cells]
    videos: dict[Path, DecodedVideo] = {}
    warmed = False
    for q in questions:
        if q.video not in videos:
            videos[q.video] = decode_video(q.video, options.num_frames, options.backend)
        video = videos[q.video]
        if not warmed:  # first-call costs (allocations, kernels) go to no cell
            qa.ask(video, q.question, **cell_options[0])
            warmed = True
        runs: list[list[AskResult]] = [[] for _ in cells]
        for _ in range(repeats):
            for i, opts in enumerate(cell_options):
                runs[i].append(qa.ask(video, q.question, **opts))
                on_step()
        reference_answer = runs[0][0].answer if cells and cells[0].method == "none" else None
        for cell, results in zip(cells, runs, strict=True):
            _record(cell, q, results, reference_answer)
    return cells


def options_for(cell: Cell, options: AskOptions) -> AskOptions:
    """The shared options, with this cell's method and budget; --prune-after only where it applies."""
    prune_after = options.prune_after if METHODS[cell.method].allows_prune_after else None
    budget = options.budget if cell.method == "none" else cell.budget
    return replace(options, method=cell.method, budget=budget, prune_after=prune_after)


def _record(cell: Cell, q: Question, results: list[AskResult], none_answer: str | None) -> None:
    first = results[0]
    stats = first.to_dict()
    cell.first_result = cell.first_result or first
    cell.answers.append(first.answer)
    if q.answer is not None:
        cell.correct.append(is_correct(first.answer, q.answer))
        cell.types.append(q.type or "")
    if none_answer is not None:
        cell.agrees.append(is_correct(first.answer, none_answer))
    cell.visual_tokens.append(stats["tokens"]["visual_after"])
    cell.equivalent.append(stats["tokens"]["equivalent_visual"])
    cell.flops.append(stats["flops"]["prefill"])
    cell.prefill_ms.append(statistics.median(r.seconds["prefill"] * 1000 for r in results))
    cell.total_ms.append(statistics.median(r.seconds["total"] * 1000 for r in results))
    peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes]
    if peaks:
        cell.peak_bytes.append(max(peaks))


def sweep_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    reference = next((c for c in cells if c.method == "none"), None)
    return [c.row(reference) for c in cells]


def write_outputs(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """sweep.csv, sweep.json, accuracy.png and latency.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "sweep.csv", "json": out_dir / "sweep.json",
             "accuracy": out_dir / "accuracy.png", "latency": out_dir / "latency.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    graded = any(r["accuracy"] is not None for r in rows)
    metric = "accuracy" if graded else "agreement_with_none"
    _plot(rows, metric, "accuracy" if graded else "agreement with the unpruned answer", paths["accuracy"])
    _plot(rows, "prefill_ms", "LLM prefill latency (ms)", paths["latency"])
    return paths


def _plot(rows: list[dict[str, Any]], key: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["visual_tokens"], r[key]) for r in rows if r["method"] == method and r[key] is not None)
        if not points:
            continue
        if method == "none":
            ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="none (all tokens)")
        else:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xscale("log")
    ticks = sorted({r["visual_tokens"] for r in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens after pruning (budget)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
