"""`vidsparse sweep`: accuracy, latency and memory for every method x budget on the same clips.

Timings are fair to every cell: one warm-up run first, then the cells interleaved (A, B, C, A,
B, C, ...) `repeats` times per question, and the median taken, so machine drift favours nobody.
`none` does not depend on the budget and is one cell, the reference for speedups.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vidsparse.answer import AskResult
from vidsparse.errors import UserError
from vidsparse.metrics import is_correct
from vidsparse.options import AskOptions, Budget
from vidsparse.outputs import replace_file, save_figure
from vidsparse.pipeline import VideoQA
from vidsparse.pruning import CUTTERS, METHODS, check_method
from vidsparse.questions import Question
from vidsparse.video import DecodedVideo, decode_clip


@dataclass
class Cell:
    method: str
    budget: str  # as the user wrote it ("-" for none)
    budget_value: Budget | None = None  # None for none
    tower_cut: int | None = None  # --tower-cut, where the method takes it
    answers: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    types: list[str] = field(default_factory=list)  # question type of each graded answer
    agrees: list[bool] = field(default_factory=list)  # same answer as `none`
    visual_tokens: list[int] = field(default_factory=list)
    equivalent: list[float] = field(default_factory=list)
    flops: list[int] = field(default_factory=list)
    flops_unpruned: list[int] = field(default_factory=list)
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
            **({} if self.tower_cut is None else {"tower_cut": self.tower_cut}),
            "questions": len(self.answers),
            "visual_tokens": round(mean(self.visual_tokens), 1),
            "answer": self.answers[0] if len(self.answers) == 1 else None,
            "accuracy": round(mean(self.correct), 4) if self.correct else None,
            "agreement_with_none": round(mean(self.agrees), 4) if self.agrees else None,
            "equivalent_tokens": round(mean(self.equivalent), 1),
            "prefill_tflops": round(mean(self.flops) / 1e12, 9),  # kFLOP resolution: small models run at MFLOPs
            "prefill_flops_share": round(sum(self.flops) / sum(self.flops_unpruned), 4),
            "prefill_ms": round(prefill, 2),
            "total_ms": round(total, 2),
            "peak_mb": round(max(self.peak_bytes) / 2**20, 1) if self.peak_bytes else None,
            "prefill_speedup": round(mean(reference.prefill_ms) / prefill, 3) if reference else None,
            "total_speedup": round(mean(reference.total_ms) / total, 3) if reference else None,
            **{f"accuracy_{t}": acc for t, acc in by_type.items()},
        }


def sweep_cells(methods: list[str], budgets: list[Budget], options: AskOptions) -> list[Cell]:
    """One cell for `none`, one per other method x budget; options checked up front."""
    if not methods or not budgets:
        raise UserError("--methods and --budgets need at least one value each")
    for method in methods:
        o = options_for(Cell(method, ""), options)
        check_method(o.method, o.prune_after)
    if options.prune_after is not None and not any(METHODS[m].allows_prune_after for m in methods):
        raise UserError(f"--prune-after applies to none of --methods {','.join(methods)}: each prunes where its "
                        "definition says")
    if options.tower_cut is not None and not any(METHODS[m].chooses_by_layout for m in methods):
        raise UserError(f"--tower-cut applies to none of --methods {','.join(methods)}: it needs a method whose "
                        f"first stage depends on the clip's layout alone ({CUTTERS})")
    cells = [Cell("none", "-")] if "none" in methods else []
    return cells + [Cell(m, str(b), b, options.tower_cut if METHODS[m].chooses_by_layout else None)
                    for m in methods if m != "none" for b in budgets]


def run_sweep(qa: VideoQA, questions: list[Question], cells: list[Cell], options: AskOptions, repeats: int,
              on_step: Callable[[], None] = lambda: None,
              on_cell_done: Callable[[], None] = lambda: None,
              decoded: Mapping[Path, DecodedVideo] = MappingProxyType({})) -> list[str]:
    """Fill every cell with every question's answer and median timings; `on_cell_done` is called each
    time a cell has finished one more question (so a crash keeps what was done). Questions are taken
    clip by clip: each clip is decoded (unless it is in `decoded` already) and run through the vision
    tower once for every cell (whose times still include that work, as an `ask` would pay it). A clip
    that cannot be decoded, and a question that cannot be asked (empty, special tokens, too long), is
    skipped, as `batch` records it and goes on; returns why each was skipped (a clip's decoding error
    names its file)."""
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    qa.check_frames(options)
    cell_options = [options_for(c, options) for c in cells]
    for o in cell_options:  # fail before the first run, not in the middle of the sweep
        qa.check_plan(o)
    saliency = any(METHODS[c.method].needs_saliency for c in cells)
    skipped: list[str] = []

    def skip(why: str, count: int) -> None:
        skipped.append(why)
        for _ in range(count * len(cells) * repeats):
            on_step()

    warmed = False
    by_video: dict[Path, list[Question]] = {}
    for q in questions:
        refused = qa.checked_prompt(q.question, qa.smallest_clip(options), options)
        if isinstance(refused, UserError):
            skip(f"question {q.id!r}: {refused}", 1)
        else:
            by_video.setdefault(q.video, []).append(q)
    for path, asked in by_video.items():  # one clip in memory at a time, decoded and through the tower once
        try:
            video = decoded.get(path) or decode_clip(path, options)
        except UserError as e:
            skip(str(e), len(asked))
            continue
        if not warmed:  # first-call costs (allocations, kernels) go to no cell
            qa.answer(video, asked[0].question, cell_options[0])
            warmed = True
        # Every cell's run counts the features' time as its own. A tower cut's features are its own.
        cuts = [qa.tower_cut_of(video, opts) for opts in cell_options]
        features = {cut: qa.clip_features(video, saliency and cut is None, cut) for cut in dict.fromkeys(cuts)}
        for q in asked:
            runs: list[list[AskResult]] = [[] for _ in cells]
            reference_answer = None
            for repeat in range(repeats):
                for i, (cell, opts) in enumerate(zip(cells, cell_options, strict=True)):
                    runs[i].append(qa.answer(video, q.question, opts, features[cuts[i]]))
                    on_step()
                    if repeat == repeats - 1:
                        if i == 0 and cell.method == "none":
                            reference_answer = runs[0][0].answer
                        _record(cell, q, runs[i], reference_answer)
                        on_cell_done()
    return skipped


def options_for(cell: Cell, options: AskOptions) -> AskOptions:
    """The shared options, with this cell's method, budget and tower cut; --prune-after only where it
    applies."""
    prune_after = options.prune_after if METHODS[cell.method].allows_prune_after else None
    budget = options.budget if cell.method == "none" else cell.budget_value
    return replace(options, method=cell.method, budget=budget, prune_after=prune_after, tower_cut=cell.tower_cut)


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
    cell.flops_unpruned.append(stats["flops"]["prefill_unpruned"])
    cell.prefill_ms.append(statistics.median(r.seconds["prefill"] * 1000 for r in results))
    cell.total_ms.append(statistics.median(r.seconds["total"] * 1000 for r in results))
    peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes]
    if peaks:
        cell.peak_bytes.append(max(peaks))


def sweep_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """A row per cell that has answered at least one question."""
    reference = next((c for c in cells if c.method == "none" and c.answers), None)
    return [c.row(reference) for c in cells if c.answers]


MARKER = ".vidsparse-sweep"  # in an --out folder: a sweep wrote it, and another may replace what that one wrote


def check_out_folder(out_dir: Path) -> None:
    """A sweep writes into a new or empty folder, or one that holds a sweep's marker; any other folder
    is the user's, whose files (a picture that happens to be called latency.png) it must neither replace
    nor remove. Checked before the model is loaded."""
    if (out_dir / MARKER).is_file() or not any(out_dir.iterdir()):
        return
    raise UserError(f"--out {out_dir} is not empty and holds no {MARKER} (the mark of a sweep's folder): give a "
                    "new or empty folder, so that no file of yours is replaced")


def claim_folder(out_dir: Path) -> None:
    """Mark the folder as a sweep's, as it receives its first file (a sweep refused before that leaves
    no folder, and one stopped after it leaves a folder a sweep may write into again)."""
    marker = out_dir / MARKER
    if not marker.is_file():
        replace_file(marker, "This folder holds the output of `vidsparse sweep`: a later sweep into it replaces "
                     "its sweep.*, latency.png, accuracy*.png and kept-<method>.png, and no other file.\n")


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """sweep.csv, sweep.json and sweep.md, each replaced whole (a crash leaves the previous complete
    version), in a folder marked as a sweep's."""
    claim_folder(out_dir)
    paths = {"csv": out_dir / "sweep.csv", "json": out_dir / "sweep.json", "markdown": out_dir / "sweep.md"}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    writer.writerows(rows)
    replace_file(paths["csv"], buffer.getvalue())
    replace_file(paths["json"], json.dumps(rows, indent=1, allow_nan=False) + "\n")
    replace_file(paths["markdown"], markdown_table(rows))
    return paths


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Method x budget with tokens, equivalent tokens, prefill FLOPs share and the quality (accuracy
    overall and per question type, or agreement with `none`), ready to paste into a report."""
    types = sorted({key.removeprefix("accuracy_") for row in rows for key in row if key.startswith("accuracy_")})
    graded = any(row["accuracy"] is not None for row in rows)
    quality = "accuracy" if graded else "agreement_with_none"
    header = ["method", "budget", "tokens", "equiv. tokens", "prefill FLOPs", quality.replace("_", " "), *types]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        value = row[quality]
        method = row["method"] if row.get("tower_cut") is None else f"{row['method']}, tower cut {row['tower_cut']}"
        cells = [method, row["budget"], f"{row['visual_tokens']:g}", f"{row['equivalent_tokens']:g}",
                 f"{row['prefill_flops_share']:.1%}", "-" if value is None else f"{value:.3f}",
                 *(f"{row.get('accuracy_' + t, 0):.2f}" if "accuracy_" + t in row else "-" for t in types)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """latency.png, and accuracy.png / accuracy_vs_flops.png where there is something to grade against
    (reference answers, or the `none` cell's answers): methods compared at equal tokens and at equal
    cost (in-LLM methods pay for the layers before their first stage)."""
    paths = {"latency": out_dir / "latency.png"}
    _plot(rows, "visual_tokens", "prefill_ms", "LLM prefill latency (ms)", paths["latency"])
    graded = any(r["accuracy"] is not None for r in rows)
    metric = "accuracy" if graded else "agreement_with_none"
    label = "accuracy" if graded else "agreement with the unpruned answer"
    if any(r[metric] is not None for r in rows):
        paths["accuracy"] = out_dir / "accuracy.png"
        _plot(rows, "visual_tokens", metric, label, paths["accuracy"])
        paths["accuracy_vs_flops"] = out_dir / "accuracy_vs_flops.png"
        _plot(rows, "prefill_flops_share", metric, label, paths["accuracy_vs_flops"])
    return paths


PICTURES = ("latency.png", "accuracy.png", "accuracy_vs_flops.png", *(f"kept-{m}.png" for m in METHODS))  # a sweep's


def remove_stale_pictures(out_dir: Path, written: list[Path]) -> None:
    """The pictures an earlier sweep into this (marked) folder drew and this run did not draw again (of
    other methods, or with something to grade) would pass for this run's: they are removed; no other
    file is."""
    for name in PICTURES:
        if out_dir / name not in written:
            (out_dir / name).unlink(missing_ok=True)


X_AXES = {"visual_tokens": "visual tokens after pruning (budget)",
          "prefill_flops_share": "LLM prefill FLOPs, share of none's"}


def _plot(rows: list[dict[str, Any]], x_key: str, key: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r[x_key], r[key]) for r in rows if r["method"] == method and r[key] is not None)
        if not points:
            continue
        if method == "none":
            ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="none (all tokens)")
        else:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xscale("log")
    values = sorted({r[x_key] for r in rows if r["method"] != "none"} or {r[x_key] for r in rows})
    if x_key == "prefill_flops_share":  # round shares as ticks: measured ones crowd each other
        ticks = [t for t in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0) if values[0] * 0.9 <= t <= values[-1] * 1.1]
        labels = [f"{t:.0%}" for t in ticks]
    else:
        ticks, labels = values, [f"{t:g}" for t in values]
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel(X_AXES[x_key])
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
