"""How deep in the decoder each question type still needs every visual token: every token goes through
layers 0..L, then the clip is cut to B tokens (stprune's question-guided stage alone, M = n) for the
rest, for each L. A type that keeps its full-budget accuracy once L is small is answered from a few
tokens late in the decoder, so pruning early can keep it; a type that needs L close to the last layer
is read from the whole clip late, and no choice of B tokens made early keeps it.

On a yardstick's tuning clips (rendered in memory; never the held-out seed):

    python -m lab.read_depth --yardstick hd --n 700 --budget 10%

Prints the table (accuracy per type, and as a share of `none`'s), writes
lab/results/read_depth_<yardstick>.json and a plot of each type's share of full accuracy against L.
"""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging

from lab.shapes_accuracy import Run, per_type_accuracy, print_table, save_rows, tuning_arguments, tuning_setup
from lab.stprune_ablation import EVERY_TOKEN
from vidsparse.outputs import save_figure


def depth_runs(budget: str, layers: int) -> list[Run]:
    """Cut to B after each layer that leaves at least one layer after it."""
    return [Run(f"every token through layer {cut}, then B", "stprune", budget,
                {"SUMMARY_FACTOR": EVERY_TOKEN, "QUESTION_LAYER": cut}) for cut in range(1, layers - 1)]


def plot(rows: list[dict], types: tuple[str, ...], budget: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, cut_rows = rows[0], rows[1:]
    cuts = [row["settings"]["QUESTION_LAYER"] for row in cut_rows]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for qtype in (*types, "overall"):
        shares = [row[qtype] / full[qtype] if full[qtype] else 0.0 for row in cut_rows]
        axes.plot(cuts, shares, marker="o", label=qtype, linewidth=2.5 if qtype == "overall" else 1.2)
    axes.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel(f"every visual token through decoder layers 0..L, then {budget} of them")
    axes.set_ylabel("accuracy, share of every token's")
    axes.set_xticks(cuts)
    axes.legend(fontsize=8, ncol=2)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def main() -> None:
    parser = tuning_arguments(__doc__, 700)
    args = parser.parse_args()
    logging.set_verbosity_error()
    yardstick, seed, qa = tuning_setup(parser, args)
    runs = [Run("none", "none", "100%"), *depth_runs(args.budget, len(qa.model.decoder.layers))]
    rows = per_type_accuracy(qa, yardstick.data, args.n, seed, runs)
    for row, run in zip(rows, runs, strict=True):
        row["settings"] = run.settings
    print_table(rows, yardstick.data.QUESTION_TYPES)
    out = save_rows(args, seed, rows, "read_depth")
    plot(rows, yardstick.data.QUESTION_TYPES, args.budget, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
