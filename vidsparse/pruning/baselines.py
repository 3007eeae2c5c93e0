"""Text-agnostic baselines that prune before layer 0 (SPEC section 5): random and uniform."""

from __future__ import annotations

import math

import torch

from vidsparse.pruning.base import BeforeFirstLayer, Method, Selection, StageInput, top_k


class NoPruning(Method):
    summary = "vanilla VideoLLaVA: every visual token through every layer"
    allows_prune_after = False

    def default_stages(self, num_layers: int) -> list[int]:
        return []


class RandomPruning(BeforeFirstLayer):
    summary = "B visual tokens drawn uniformly at random (seeded), before layer 0"

    def select(self, stage: StageInput) -> Selection:
        scores = torch.rand(stage.frames.numel(), generator=stage.generator).to(stage.frames.device)
        return Selection(top_k(scores, stage.budget, stage.frames, stage.min_per_frame))


class UniformPruning(BeforeFirstLayer):
    summary = ("an equal share of B per frame (remainder to the earliest), a 2-D grid of patches inside each "
               "frame, shifted from frame to frame so that the frames together cover the image")

    def select(self, stage: StageInput) -> Selection:
        return Selection(lattice(stage.frames, stage.rows, stage.cols, stage.budget))


def lattice(frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, budget: int) -> torch.Tensor:
    """Ascending indices of `budget` tokens of a whole clip (frame-major, every patch present): an
    equal share per frame (remainder to the earliest), a shifted 2-D grid inside each (grid_picks)."""
    frame_ids, counts = frames.unique_consecutive(return_counts=True)
    share, extra = divmod(budget, len(frame_ids))
    keep, start = [], 0
    for t, count in enumerate(counts.tolist()):
        want = min(count, share + (1 if t < extra else 0))
        keep.append(start + grid_picks(rows[start : start + count], cols[start : start + count], want, t))
        start += count
    return torch.cat(keep)


# Per-frame grid offsets: the R2 low-discrepancy sequence (steps 1/rho and 1/rho^2, rho the plastic
# number), so that the offsets of successive frames fill the unit square evenly.
_R2_STEPS = (0.7548776662466927, 0.5698402909980532)


def grid_picks(rows: torch.Tensor, cols: torch.Tensor, want: int, frame: int) -> torch.Tensor:
    """Ascending indices of `want` of one frame's tokens (`rows`/`cols` their patch coordinates, -1 for
    CLS): a lattice of R rows of near-equal counts, each point at the same offset inside its cell;
    the offset is the cell centre in frame 0 and moves along the R2 sequence with `frame`. CLS only
    when every patch is already taken."""
    patch = (rows >= 0).nonzero().squeeze(1)
    if want > patch.numel():  # want == every token of the frame
        return torch.arange(rows.numel(), device=rows.device)
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    lattice_rows = min(want, height, max(-(-want // width), math.ceil(math.sqrt(want * height / width))))
    dy, dx = ((0.5 + frame * step) % 1.0 for step in _R2_STEPS)
    index_of = {(int(r), int(c)): int(i) for i, r, c in zip(patch, rows[patch], cols[patch], strict=True)}
    picks = []
    for i in range(lattice_rows):
        in_row = want // lattice_rows + (1 if i < want % lattice_rows else 0)
        row = int((i + dy) * height / lattice_rows)
        picks += [index_of[row, int((j + dx) * width / in_row)] for j in range(in_row)]
    return torch.tensor(sorted(picks), dtype=torch.long, device=rows.device)
