"""Visual-token pruning: the methods, and the plan (method + stages + budget) a run follows."""

from __future__ import annotations

from collections.abc import Sequence

from vidsparse.errors import UserError
from vidsparse.options import METHOD_NAMES, AskOptions, PositionMode
from vidsparse.pruning.attention_scored import FastV, PyramidDrop
from vidsparse.pruning.base import Method, PruningPlan, check_floor
from vidsparse.pruning.baselines import NoPruning, RandomPruning, UniformPruning
from vidsparse.pruning.dycoke import DyCoke
from vidsparse.pruning.fastvid import FastVID
from vidsparse.pruning.sparsevlm import SparseVLM
from vidsparse.pruning.stprune import STPrune
from vidsparse.pruning.tome import ToMe
from vidsparse.pruning.vidcom2 import VidCom2

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoPruning, RandomPruning, UniformPruning, FastV, PyramidDrop, ToMe, SparseVLM, VidCom2,
                              FastVID, DyCoke, STPrune)
}
if tuple(METHODS) != METHOD_NAMES:  # the torch-free list the CLI offers must name exactly these
    raise ImportError(f"vidsparse.options.METHOD_NAMES {METHOD_NAMES} != the registered methods {tuple(METHODS)}")


def check_method(method: str, prune_after: Sequence[int] | None) -> None:
    """The method-specific rule that needs no model: which methods take --prune-after."""
    if prune_after is not None and not METHODS[method].allows_prune_after:
        raise UserError(f"--prune-after does not apply to {method!r}: it {where_it_prunes(method)}")


def where_it_prunes(method: str) -> str:
    """The fixed stages of a method that takes no --prune-after, in words (as in a 32-layer decoder)."""
    stages = METHODS[method]().default_stages(32)
    if not stages:
        return "does not prune"
    after = [f"after layer {layer}" for layer in stages if layer >= 0]
    return "prunes " + " and ".join(["before layer 0"] * (stages[0] < 0) + after) + " by definition"


def make_plan(method: str, budget: int, num_layers: int, *, prune_after: Sequence[int] | None = None,
              positions: PositionMode = "keep", min_per_frame: int = 0, seed: int = 0,
              clip: tuple[int, int] | None = None) -> PruningPlan:
    """The plan of one run (a fresh method instance), from already-typed options and the decoder's
    depth. `clip` = (frames, visual tokens), when known, also checks that the per-frame floor fits."""
    check_method(method, prune_after)
    chosen = METHODS[method]()
    given = prune_after is not None
    stages = list(prune_after) if given else chosen.default_stages(num_layers)
    if stages and stages[-1] > num_layers - 2:  # a stage after the last layer would change nothing
        raise UserError(
            f"--prune-after layers must be between 0 and {num_layers - 2} for this {num_layers}-layer decoder"
            if given else
            f"{method} prunes after layer {stages[-1]} by default, but the decoder has only {num_layers} layers: "
            "pass --prune-after")
    if clip is not None and method != "none" and budget < clip[1]:
        check_floor(budget, clip[0], min_per_frame)
    return PruningPlan(chosen, stages, budget, positions, min_per_frame, seed)


def plan_for(options: AskOptions, num_layers: int, num_frames: int, num_visual: int) -> PruningPlan:
    """make_plan for a clip of `num_frames` frames and `num_visual` visual tokens."""
    return make_plan(options.method, options.budget.tokens(num_visual), num_layers, prune_after=options.prune_after,
                     positions=options.positions, min_per_frame=options.min_per_frame, seed=options.seed,
                     clip=(num_frames, num_visual))
