"""Answer matching and the summary of a set of results."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual exact-match convention)."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def accuracy(records: list[dict[str, Any]]) -> float | None:
    graded = [r["correct"] for r in records if r.get("correct") is not None]
    return round(sum(graded) / len(graded), 4) if graded else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Count, accuracy overall and per type, latency per stage, memory, tokens and FLOPs."""
    answered = [r for r in records if not r.get("error")]
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in answered:
        by_type[str(r.get("type") or "all")].append(r)
    stages = list(dict.fromkeys(name for r in answered for name in r.get("time_ms", {})))
    peaks = [r["memory"]["peak_bytes"] for r in answered if r.get("memory", {}).get("peak_bytes")]
    return {
        "questions": len(records),
        "answered": len(answered),
        "errors": len(records) - len(answered),
        "accuracy": accuracy(answered),
        "accuracy_by_type": {t: accuracy(rs) for t, rs in sorted(by_type.items())},
        "count_by_type": {t: len(rs) for t, rs in sorted(by_type.items())},
        "time_ms_mean": {s: _mean([r["time_ms"][s] for r in answered if s in r["time_ms"]]) for s in stages},
        "time_ms_median": {s: _median([r["time_ms"][s] for r in answered if s in r["time_ms"]]) for s in stages},
        "peak_memory_bytes": max(peaks) if peaks else None,
        "equivalent_visual_tokens_mean": _mean([r["tokens"]["equivalent_visual"] for r in answered]),
        "prefill_flops_mean": _mean([r["flops"]["prefill"] for r in answered]),
        # Own prefill plus the share of the clip's shared prefill and vision tower (absent in old records).
        "amortised_flops_mean": _mean([r["flops"]["amortised"] for r in answered if "amortised" in r["flops"]]),
    }
