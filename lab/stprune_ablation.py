"""What each part of stprune buys: the shipped method beside variants that remove or change one part,
on a yardstick's tuning clips (rendered in memory from a seed no evaluation uses), at one budget.

    python -m lab.stprune_ablation --yardstick hd --n 300 --seed 515151 --budget 10%
    python -m lab.stprune_ablation --yardstick demo --n 300 --seed 777 --budget 10%

Variants are set through the module's constants (`vidsparse/pruning/stprune.py`), one run at a time:
stage 1 alone (the lattice to B: `uniform`), stage 2 by plain top-k relevance (no redundancy term),
raters only / last prompt token only, stage 2 after layer 2, a larger first stage (M = 3B), and
every token through the first layers (stage 2 alone).
"""

from __future__ import annotations

from transformers.utils import logging

from lab.shapes_accuracy import Run, per_type_accuracy, print_table, save_rows, tuning_arguments, tuning_setup

EVERY_TOKEN = 1e9  # a first stage of min(n, this x B) tokens keeps them all


def variants(budget: str) -> list[Run]:
    return [
        Run("stprune as shipped", "stprune", budget),
        Run("stage 1 only: the lattice to B (= uniform)", "uniform", budget),
        Run("stage 2 by plain top-k relevance", "stprune", budget, {"REDUNDANCY_WEIGHT": 0.0}),
        Run("raters only", "stprune", budget, {"RATER_WEIGHT": 1.0}),
        Run("last prompt token only", "stprune", budget, {"RATER_WEIGHT": 0.0}),
        Run("stage 2 after layer 2", "stprune", budget, {"QUESTION_LAYER": 2}),
        Run("M = 3B", "stprune", budget, {"SUMMARY_FACTOR": 3.0}),
        Run("M = n: every token through the first layers (stage 2 alone)", "stprune", budget,
            {"SUMMARY_FACTOR": EVERY_TOKEN}),
    ]


def main() -> None:
    parser = tuning_arguments(__doc__, 300)
    args = parser.parse_args()
    logging.set_verbosity_error()
    yardstick, seed, qa = tuning_setup(parser, args)
    rows = per_type_accuracy(qa, yardstick.data, args.n, seed, [Run("none", "none", "100%"), *variants(args.budget)])
    print_table(rows, yardstick.data.QUESTION_TYPES)
    save_rows(args, seed, rows, "stprune_ablation")


if __name__ == "__main__":
    main()
