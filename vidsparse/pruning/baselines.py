"""Text-agnostic baselines that prune before layer 0 (SPEC section 5): random and uniform."""

from __future__ import annotations

import math

import torch

from vidsparse.models.visual import ClipGrid
from vidsparse.pruning.base import BeforeFirstLayer, Method, Selection, StageInput, top_k
from vidsparse.transfer import to_device


class NoPruning(Method):
    summary = "vanilla VideoLLaVA: every visual token through every layer"
    allows_prune_after = False

    def default_stages(self, num_layers: int) -> list[int]:
        return []


class RandomPruning(BeforeFirstLayer):
    summary = "B visual tokens drawn uniformly at random (seeded), before layer 0"

    def select(self, stage: StageInput) -> Selection:
        scores = to_device(torch.rand(stage.frames.numel(), generator=stage.generator), stage.frames.device)
        return Selection(top_k(scores, stage.budget, stage.frames, stage.min_per_frame))


class UniformPruning(BeforeFirstLayer):
    summary = ("an equal share of B per frame (remainder to the earliest), a 2-D grid of patches inside each "
               "frame, shifted from frame to frame so that the frames together cover the image")

    chooses_by_layout = True

    def layout_stage(self, grid: ClipGrid, budget: int) -> list[int]:
        return lattice(grid, budget)

    def select(self, stage: StageInput) -> Selection:
        return Selection(to_device(self.layout_stage(stage.grid, stage.budget), stage.hidden.device))


def lattice(grid: ClipGrid, budget: int) -> list[int]:
    """Ascending indices of `budget` tokens of a whole clip laid out as `grid`: an equal share per
    frame (remainder to the earliest), a shifted 2-D grid inside each (grid_picks). Python numbers
    only: the plan is made on the host and reaches the device as one copy."""
    share, extra = divmod(budget, grid.frames)
    return [t * grid.per_frame + i for t in range(grid.frames)
            for i in grid_picks(grid, min(grid.per_frame, share + (1 if t < extra else 0)), t)]


# Per-frame grid offsets: the R2 low-discrepancy sequence (steps 1/rho and 1/rho^2, rho the plastic
# number), so that the offsets of successive frames fill the unit square evenly.
_R2_STEPS = (0.7548776662466927, 0.5698402909980532)


def grid_picks(grid: ClipGrid, want: int, frame: int) -> list[int]:
    """Ascending indices inside one frame of `want` of its tokens: a lattice of R rows of near-equal
    counts, each point at the same offset inside its cell; the offset is the cell centre in frame 0
    and moves along the R2 sequence with `frame`. CLS only when every patch is already taken."""
    height, width = grid.rows, grid.cols
    if want > height * width:  # want == every token of the frame
        return list(range(grid.per_frame))
    lattice_rows = min(want, height, max(-(-want // width), math.ceil(math.sqrt(want * height / width))))
    dy, dx = ((0.5 + frame * step) % 1.0 for step in _R2_STEPS)
    picks = []
    for i in range(lattice_rows):
        in_row = want // lattice_rows + (1 if i < want % lattice_rows else 0)
        row = int((i + dy) * height / lattice_rows)
        picks += [int(grid.cls) + row * width + int((j + dx) * width / in_row) for j in range(in_row)]
    return sorted(picks)
