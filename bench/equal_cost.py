"""Accuracy at equal prefill cost, from `vidsparse sweep` results (the issue's fair comparison).

Each method's accuracy is interpolated linearly between its measured points (prefill-FLOPs share as
the axis), never extrapolated: at a cost outside a method's measured range that method is not
compared. For every cost on a grid it prints the chosen method's accuracy, the best other method's
and the margin, then the ranges where the chosen method is at least every other one.

    python bench/equal_cost.py docs/shapes-hd-sweep/sweep.json [extra_sweep.json ...] \\
        --method stprune --from 5 --to 30 --step 0.5
"""

from __future__ import annotations

import argparse
import json
from itertools import groupby
from pathlib import Path

import numpy as np

SNAP = 0.05  # percent of the prefill: the sweep table's rounding


def curves(paths: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per method (not `none`): its measured costs (percent of `none`'s prefill) and accuracies,
    sorted by cost; later files add points to the same method."""
    points: dict[str, dict[float, float]] = {}
    for path in paths:
        for row in json.loads(path.read_text()):
            if row["method"] != "none" and row.get("accuracy") is not None:
                points.setdefault(row["method"], {})[round(100 * row["prefill_flops_share"], 3)] = row["accuracy"]
    return {m: (np.array(sorted(p)), np.array([p[c] for c in sorted(p)])) for m, p in points.items()}


def at(curve: tuple[np.ndarray, np.ndarray], cost: float) -> float | None:
    costs, accuracy = curve
    if cost < costs[0] - SNAP or cost > costs[-1] + SNAP:  # a grid point a rounding away counts as measured
        return None
    return float(np.interp(cost, costs, accuracy))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweeps", type=Path, nargs="+", help="sweep.json files of the same questions and model")
    ap.add_argument("--method", default="stprune")
    ap.add_argument("--from", dest="low", type=float, default=5.0, help="lowest cost, percent of none's prefill")
    ap.add_argument("--to", dest="high", type=float, default=30.0)
    ap.add_argument("--step", type=float, default=0.5)
    args = ap.parse_args()
    methods = curves(args.sweeps)
    ours = methods.pop(args.method)
    print(f"{'cost %':>7} {args.method:>9} {'best other':>22} {'margin':>7}")
    ahead: list[tuple[float, bool]] = []
    for cost in np.arange(args.low, args.high + 1e-9, args.step):
        mine = at(ours, cost)
        others = {m: a for m, c in methods.items() if (a := at(c, cost)) is not None}
        if mine is None or not others:
            print(f"{cost:7.1f} {'-' if mine is None else f'{mine:.3f}':>9}   (not comparable: outside measured costs)")
            continue
        best = max(others, key=others.get)
        margin = mine - others[best]
        ahead.append((cost, margin >= -1e-9))
        print(f"{cost:7.1f} {mine:9.3f} {best:>14} {others[best]:.3f} {margin:+7.3f}")
    runs = [list(run) for ok, run in groupby(ahead, key=lambda point: point[1]) if ok]
    ranges = [(run[0][0], run[-1][0]) for run in runs]
    print(f"{args.method} >= every other method at: "
          + (", ".join(f"{a:.1f}-{b:.1f}%" for a, b in ranges) if ranges else "no cost of the grid"))


if __name__ == "__main__":
    main()
