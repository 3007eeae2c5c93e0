"""What limits pruning on ShapesQA-HD: accuracy when the kept tokens are chosen from the ground truth.

The clip generator knows which object covers each pixel of each frame, so this script can keep
tokens that no pruning method could know to keep, and asks: would a better choice of tokens before
the LLM keep the shipped model's answers at 10% of the tokens? Three ground-truth choices, each
landing exactly on B and filling what is left with the `uniform` lattice:

- `oracle-objects`: every patch an object covers (>= 4 of its 64 pixels), the most covered first;
- `oracle-one-each`: the most covered patch of each object in each frame it is visible in;
- `oracle-neighbours`: those, plus the same place one frame earlier and later (motion as a comparison
  with the same place in the neighbouring frames would need them).

It prints accuracy per question type beside `none`, `uniform` and `stprune` on the same questions
(rendered from the held-out seed, never used for tuning):

    python -m lab.object_oracle --n 500 --seed 434343 --budgets 10%,30%
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from transformers.utils import logging

from lab.pointer_loss import object_pixels
from lab.shapes_accuracy import Run, per_type_accuracy, print_table
from vidsparse.datasets import shapes_hd
from vidsparse.pipeline import VideoQA
from vidsparse.pruning import METHODS
from vidsparse.pruning.base import BEFORE_FIRST_LAYER, Method, Selection, StageInput
from vidsparse.pruning.baselines import lattice
from vidsparse.transfer import to_device

MIN_PIXELS = 4  # of a patch's 64, for the patch to count as covered by an object
# The engine hands a method the tokens, not the ground truth: the clip being answered is set here.
current_clip: list[shapes_hd.Clip] = []


def ground_truth_priority(kind: str, clip: shapes_hd.Clip) -> list[int]:
    """Indices of the clip's visual tokens (frame-major, CLS first in each frame) that `kind` keeps
    first, best first."""
    pixels = np.stack([object_pixels(clip.ids, k, shapes_hd.PATCH) for k in range(len(clip.objects))], -1)
    if kind == "objects":
        covered = np.nonzero(pixels.max(-1) >= MIN_PIXELS)[0]
        return covered[np.argsort(-pixels.max(-1)[covered], kind="stable")].tolist()
    per_frame = len(pixels) // shapes_hd.FRAMES
    picks = []
    for f in range(shapes_hd.FRAMES):
        for k in range(pixels.shape[1]):
            in_frame = pixels[f * per_frame : (f + 1) * per_frame, k]
            if in_frame.max() > 0:
                neighbours = [g for g in (f - 1, f + 1) if 0 <= g < shapes_hd.FRAMES] if kind == "neighbours" else []
                picks += [g * per_frame + int(in_frame.argmax()) for g in (f, *neighbours)]
    return picks


def oracle(kind: str) -> type[Method]:
    class GroundTruth(Method):
        summary = f"ground truth: {kind} first, then the uniform lattice"

        def default_stages(self, num_layers: int) -> list[int]:
            return [BEFORE_FIRST_LAYER]  # its one stage sees the whole clip, in token order

        def select(self, stage: StageInput) -> Selection:
            first = ground_truth_priority(kind, current_clip[0])
            fill = lattice(stage.grid, stage.budget)
            keep = list(dict.fromkeys(first + fill))[: stage.budget]  # fill alone has B distinct tokens
            return Selection(to_device(sorted(keep), stage.hidden.device), in_clip_order=True)

    return GroundTruth


ORACLES = {f"oracle-{kind}": oracle(kind) for kind in ("objects", "one-each", "neighbours")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=434343)
    parser.add_argument("--budgets", default="10%,30%")
    parser.add_argument("--out", type=Path, default=Path("lab/results/object_oracle.json"))
    args = parser.parse_args()
    logging.set_verbosity_error()
    METHODS.update(ORACLES)
    qa = VideoQA.from_pretrained("shapes-hd", dtype="float32", device="cpu")
    runs = [Run("none", "none", "100%")] + [Run(m, m, b) for b in args.budgets.split(",")
                                             for m in ("uniform", "stprune", *ORACLES)]

    def remember(clip: shapes_hd.Clip) -> None:
        current_clip[:] = [clip]

    rows = per_type_accuracy(qa, shapes_hd, args.n, args.seed, runs, on_clip=remember)
    print_table(rows, shapes_hd.QUESTION_TYPES)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": args.n, "seed": args.seed, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
