"""Visual-token pruning: the methods, and the plan (method + stages + budget) a run follows."""

from __future__ import annotations

from vidsparse.errors import UserError
from vidsparse.pruning.attention_scored import FastV, PyramidDrop
from vidsparse.pruning.base import Method, PruningPlan, check_floor
from vidsparse.pruning.baselines import NoPruning, RandomPruning, UniformPruning
from vidsparse.pruning.sparsevlm import SparseVLM
from vidsparse.pruning.tome import ToMe

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoPruning, RandomPruning, UniformPruning, FastV, PyramidDrop, ToMe, SparseVLM)
}
POSITION_MODES = ("keep", "compact")


def parse_stages(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--prune-after takes layer numbers like '1' or '2,6,15', got {text!r}") from None


def parse_budget(budget: int | str) -> int | float:
    """`194` -> 194 tokens; `10%` -> the fraction 0.1 of the clip's visual tokens."""
    text = str(budget).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise UserError(f"--budget takes a token count or a percentage like 10%, got {text!r}") from None
        if not 0 < percent <= 100:
            raise UserError(f"--budget percentage must be in (0, 100], got {text}")
        return percent / 100
    try:
        tokens = int(text)
    except ValueError:
        raise UserError(f"--budget takes a token count or a percentage like 10%, got {text!r}") from None
    if tokens < 1:
        raise UserError(f"--budget must be at least 1 visual token, got {tokens}")
    return tokens


def resolve_budget(budget: int | str, num_visual: int) -> int:
    """Visual tokens for this clip: a count as given, a percentage rounded (at least 1)."""
    parsed = parse_budget(budget)
    return parsed if isinstance(parsed, int) else max(1, round(parsed * num_visual))


def check_options(method: str, budget: int | str, *, prune_after: str | None = None, positions: str = "keep",
                  min_per_frame: int = 0) -> list[int] | None:
    """Everything about the options that can be checked before a model is loaded; returns the
    parsed --prune-after layers (None: the method's default)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    parse_budget(budget)
    if positions not in POSITION_MODES:
        raise UserError(f"--positions must be keep or compact, got {positions!r}")
    if min_per_frame < 0:
        raise UserError(f"--min-per-frame must be >= 0, got {min_per_frame}")
    if prune_after is None:
        return None
    if not METHODS[method].allows_prune_after:
        where = "does not prune" if method == "none" else "prunes before layer 0"
        raise UserError(f"--prune-after does not apply to {method!r}: it {where}")
    stages = parse_stages(prune_after)
    if not stages:
        raise UserError("--prune-after needs at least one layer")
    if stages != sorted(set(stages)) or stages[0] < 0:
        raise UserError(f"--prune-after layers must be >= 0 and strictly increasing, got {prune_after!r}")
    return stages


def make_plan(method: str, budget: int, num_layers: int, *, prune_after: str | None = None,
              positions: str = "keep", min_per_frame: int = 0, seed: int = 0,
              clip: tuple[int, int] | None = None) -> PruningPlan:
    """Check the options a user gave and build the plan (a fresh method instance per run).
    `clip` = (frames, visual tokens), when known, also checks that the per-frame floor fits."""
    stages = check_options(method, budget, prune_after=prune_after, positions=positions, min_per_frame=min_per_frame)
    chosen = METHODS[method]()
    given = stages is not None
    stages = stages if given else chosen.default_stages(num_layers)
    if stages and stages[-1] > num_layers - 2:  # a stage after the last layer would change nothing
        raise UserError(
            f"--prune-after layers must be between 0 and {num_layers - 2} for this {num_layers}-layer decoder"
            if given else
            f"{method} prunes after layer {stages[-1]} by default, but the decoder has only {num_layers} layers: "
            "pass --prune-after")
    if clip is not None and method != "none" and budget < clip[1]:
        check_floor(budget, clip[0], min_per_frame)
    return PruningPlan(chosen, stages, budget, positions, min_per_frame, seed)
