"""Visual-token pruning: the methods, and the plan (method + stages + budget) a run follows."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from vidsparse.errors import UserError
from vidsparse.options import METHOD_CLASSES, AskOptions, PositionMode, resolve_positions
from vidsparse.pruning.base import Method, PruningPlan, check_floor


def _method_class(where: str) -> type[Method]:
    module, name = where.rsplit(".", 1)
    return getattr(importlib.import_module(f"vidsparse.pruning.{module}"), name)


METHODS: dict[str, type[Method]] = {name: _method_class(where) for name, where in METHOD_CLASSES.items()}
CUTTERS = ", ".join(name for name, chosen in METHODS.items() if chosen.chooses_by_layout)  # take --tower-cut


def check_method(method: str, prune_after: Sequence[int] | None, num_layers: int | None = None,
                 tower_cut: int | None = None) -> None:
    """The method-specific rules: which methods take --prune-after, and which --tower-cut (`none`
    ignores it, as it does the budget). Checked at the edge, before a model is loaded (`num_layers`
    unknown), and again with the decoder's depth."""
    if prune_after is not None and not METHODS[method].allows_prune_after:
        raise UserError(f"--prune-after does not apply to {method!r}: it {where_it_prunes(method, num_layers)}")
    if tower_cut is not None and method != "none" and not METHODS[method].chooses_by_layout:
        raise UserError(f"--tower-cut needs a method whose first stage depends on the clip's layout alone "
                        f"({CUTTERS}); what {method} keeps is not known before the tower runs")


def where_it_prunes(method: str, num_layers: int | None = None) -> str:
    """The fixed stages of a method that takes no --prune-after, in words: for this decoder's depth, or,
    before a model is loaded, for Video-LLaVA-7B's 32 layers (said so)."""
    chosen = METHODS[method]()
    stages = chosen.default_stages(num_layers or 32)
    decoding = chosen.decoding_layer(num_layers or 32)
    if not stages:
        return "does not prune"
    after = [f"after layer {layer}" for layer in stages if layer >= 0]
    after += [] if decoding is None else [f"at every decoding step after layer {decoding}"]
    depth = "" if num_layers else " (in a 32-layer decoder)"
    return "prunes " + " and ".join(["before layer 0"] * (stages[0] < 0) + after) + " by definition" + depth


def make_plan(method: str, budget: int, num_layers: int, *, prune_after: Sequence[int] | None = None,
              positions: PositionMode = "keep", min_per_frame: int = 0, seed: int = 0,
              clip: tuple[int, int] | None = None, tower_cut: int | None = None) -> PruningPlan:
    """The plan of one run, from already-typed options and the decoder's depth; its one method object
    holds settings only, so the plan serves every question of a clip. `clip` = (frames, visual
    tokens), when known, also checks that the per-frame floor fits."""
    check_method(method, prune_after, num_layers, tower_cut)
    if positions not in ("keep", "compact"):  # `authors` is resolved for a model first (plan_for)
        raise ValueError(f"a plan's positions are keep or compact, got {positions!r}")
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
    decoding = chosen.decoding_layer(num_layers)
    if decoding is not None and decoding < 0:
        raise UserError(f"{method} chooses keys while decoding after a decoder layer, and a later layer must see "
                        f"them: the decoder has only {num_layers} layer(s)")
    if decoding is not None and stages and decoding <= stages[-1]:  # its keys must be the prefill's last
        raise ValueError(f"{method} chooses while decoding after layer {decoding}, not after its last stage")
    return PruningPlan(method, chosen, stages, budget, positions, min_per_frame, seed, decoding)


def plan_for(options: AskOptions, num_layers: int, num_frames: int, num_visual: int,
             position_dims: int = 1) -> PruningPlan:
    """make_plan for a clip of `num_frames` frames and `num_visual` visual tokens, on a model whose RoPE
    positions have `position_dims` components."""
    positions = resolve_positions(options.positions, options.method, position_dims)
    return make_plan(options.method, options.budget.tokens(num_visual), num_layers, prune_after=options.prune_after,
                     positions=positions, min_per_frame=options.min_per_frame, seed=options.seed,
                     clip=(num_frames, num_visual), tower_cut=options.tower_cut)
