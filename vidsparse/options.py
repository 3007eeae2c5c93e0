"""The options of one answer, parsed once at the edge (CLI flags or Python API keywords) into typed
values that the inner layers use as they are.

Torch-free on purpose: the CLI imports this module to answer `--help` and reject a bad option at
once, before the seconds it takes to import torch and transformers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, TypeVar

from vidsparse.errors import UserError

DEFAULT_MODEL = "LanguageBind/Video-LLaVA-7B-hf"
# Every pruning method: its name, and where its class lives under vidsparse.pruning (`vidsparse.pruning.METHODS`
# imports them). The one list of methods; here, torch-free, so that help and option checks need no torch.
METHOD_CLASSES = {
    "none": "baselines.NoPruning", "random": "baselines.RandomPruning", "uniform": "baselines.UniformPruning",
    "fastv": "attention_scored.FastV", "pdrop": "attention_scored.PyramidDrop", "tome": "tome.ToMe",
    "sparsevlm": "sparsevlm.SparseVLM", "vidcom2": "vidcom2.VidCom2", "fastvid": "fastvid.FastVID",
    "dycoke": "dycoke.DyCoke", "dycoke-prefill": "dycoke.DyCokePrefill", "holitom": "holitom.HoliTom",
    "flashvid": "flashvid.FlashVID",
    "stprune": "stprune.STPrune",
}
METHOD_NAMES = tuple(METHOD_CLASSES)
POSITION_MODES = ("authors", "keep", "compact")
# The methods whose original code renumbers positions after pruning before layer 0 (it shortens the
# embedding sequence before the LLM sees it); `--positions authors` (the default) numbers theirs so.
RENUMBERED_BY_AUTHORS = frozenset({"vidcom2", "dycoke", "dycoke-prefill", "holitom", "flashvid"})
# The methods that also choose visual keys at every decoding step (`Method.decoding_layer`): their
# results files say so, so that one written when `dycoke` was its prefill stand-in does not resume.
CHOOSE_WHILE_DECODING = frozenset({"dycoke"})
BACKENDS = ("auto", "decord", "pyav")
DEFAULT_MAX_FRAMES = 32  # the most frames --fps samples unless --max-frames says (the video papers' 32)
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed accepts

PositionMode = Literal["keep", "compact"]  # RoPE positions after pruning: original, or renumbered
PositionChoice = Literal["authors", "keep", "compact"]  # what a user asks: the method's authors' mode, or one
Backend = Literal["auto", "decord", "pyav"]


@dataclass(frozen=True)
class Budget:
    """Visual tokens after the last pruning stage: a count, or a share of the clip's tokens."""

    count: int | None = None
    share: float | None = None  # in (0, 1]

    def tokens(self, num_visual: int) -> int:
        """Tokens for a clip of `num_visual` visual tokens: a count as given, a share rounded (>= 1)."""
        return self.count if self.count is not None else max(1, round(self.share * num_visual))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.share * 100:g}%"


def parse_budget(value: int | str | Budget, flag: str = "--budget") -> Budget:
    """`194` -> 194 tokens; `"10%"` -> a tenth of the clip's visual tokens. A count is plain digits
    (not `1_000`, which Python's int() would take)."""
    if isinstance(value, Budget):
        return value
    text = str(value).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise UserError(f"{flag} takes a token count or a percentage like 10%, got {text!r}") from None
        if not 0 < percent <= 100:
            raise UserError(f"{flag} percentage must be in (0, 100], got {text}")
        return Budget(share=percent / 100)
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise UserError(f"{flag} takes a token count or a percentage like 10%, got {text!r}")
    tokens = int(text)
    if tokens < 1:
        raise UserError(f"{flag} must be at least 1 visual token, got {tokens}")
    return Budget(count=tokens)


def parse_budgets(text: str) -> list[Budget]:
    """`sweep --budgets 100%,25%,10%`: each item a budget."""
    return _parse_list(text, "--budgets", lambda item: parse_budget(item, "--budgets"))


def parse_methods(text: str) -> list[str]:
    """`sweep --methods none,fastv,stprune`: each item a known method."""
    return _parse_list(text, "--methods", parse_method)


T = TypeVar("T")


def _parse_list(text: str, flag: str, parse_one: Callable[[str], T]) -> list[T]:
    """A comma-separated sweep axis, each item parsed; an empty or repeated item is a mistake (a
    repeated one would measure the same cell twice)."""
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if "" in items:
        raise UserError(f"{flag} {text!r} has an empty item")
    values = [parse_one(item) for item in items]
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"{flag} names {repeated[0]} twice")
    return values


def parse_method(name: str) -> str:
    if name not in METHOD_NAMES:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(METHOD_NAMES)}")
    return name


def parse_layers(value: str | int | Sequence[int] | None) -> tuple[int, ...] | None:
    """`"2,6,15"` (or 1, or [2, 6, 15]) -> (2, 6, 15): strictly increasing layer numbers >= 0; None keeps
    the method's default."""
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        try:
            layers = tuple(int(part) for part in value.split(",")) if value.strip() else ()
        except ValueError:
            raise UserError(f"--prune-after takes layer numbers like '1' or '2,6,15', got {value!r}") from None
    else:
        layers = tuple(int(v) for v in value)
    if not layers:
        raise UserError("--prune-after needs at least one layer")
    if list(layers) != sorted(set(layers)) or layers[0] < 0:
        raise UserError(f"--prune-after layers must be >= 0 and strictly increasing, got {value!r}")
    return layers


def resolve_positions(choice: PositionChoice, method: str, position_dims: int) -> PositionMode:
    """The positions a run uses: `authors` is `compact` for the methods whose original renumbers, on a
    model with 1-D RoPE positions, and `keep` otherwise (with 3-D positions the originals' ports keep
    each token's (time, height, width), which renumbering would lose)."""
    if choice != "authors":
        return choice
    return "compact" if method in RENUMBERED_BY_AUTHORS and position_dims == 1 else "keep"


@dataclass(frozen=True)
class AskOptions:
    """Everything that decides one answer besides the model, the clip and the question."""

    method: str = "none"
    budget: Budget = Budget(count=194)
    prune_after: tuple[int, ...] | None = None  # None: the method's published stages
    positions: PositionChoice = "authors"
    min_per_frame: int = 0
    seed: int = 0
    num_frames: int = 8  # frames spread evenly over each clip, unless `fps` is given
    backend: Backend = "auto"
    max_new_tokens: int = 64
    fps: float | None = None  # frames sampled a second of video instead (as Qwen2.5-VL's processors do) ...
    max_frames: int | None = None  # ... at most this many
    # The vision tower's layers from this one on (0-based) run only on the tokens a first stage chosen
    # from the clip's layout keeps (`Method.chooses_by_layout`); None: the whole tower on every token.
    tower_cut: int | None = None

    @property
    def fewest_frames(self) -> int:
        """The fewest frames a clip can give (checked before its length is known)."""
        return self.num_frames if self.fps is None else 1

    def frames_for(self, total_frames: int, video_fps: float) -> int:
        """How many frames to sample from a clip of `total_frames` frames at `video_fps` (0: not known)."""
        if self.fps is None:
            return self.num_frames
        if video_fps <= 0:
            raise UserError("the video does not say its frame rate, so --fps cannot sample it: use --frames")
        wanted = round(total_frames / video_fps * self.fps)  # never more than the clip has (HF caps so too)
        return max(1, min(self.max_frames or DEFAULT_MAX_FRAMES, total_frames, wanted))

    def settings(self) -> dict[str, Any]:
        """JSON-ready values of what decides the answers, the budget as the user would write it. Without
        pruning, the pruning options decide nothing: they are recorded as used (every token, in place),
        and the seed, which only `random` reads, not at all, so that a results file of `--method none`
        resumes whatever --budget or --seed the command line repeats (an earlier version's too)."""
        used = self
        if self.method == "none":
            used = replace(self, budget=Budget(share=1.0), positions="keep", min_per_frame=0, tower_cut=None)
        elif self.positions == "authors" and self.method not in RENUMBERED_BY_AUTHORS:
            used = replace(self, positions="keep")  # what it means for this method, as earlier versions wrote
        settings = {**asdict(used), "budget": str(used.budget),
                    "prune_after": None if used.prune_after is None else list(used.prune_after)}
        if self.method == "none":  # left out, not recorded as 0: a header that holds one is not compared on it
            del settings["seed"]
        if self.method in CHOOSE_WHILE_DECODING:
            settings["prunes_while_decoding"] = True
        # Sampling by time is recorded as such, and sampling by count as earlier versions recorded it.
        for key in ("fps", "max_frames") if self.fps is None else ("num_frames",):
            del settings[key]
        if used.tower_cut is None:  # as earlier versions, which had no cut, recorded it
            del settings["tower_cut"]
        return settings


def ask_options(method: str = "none", budget: int | str | Budget = 194,
                prune_after: str | int | Sequence[int] | None = None,
                positions: str = "authors", min_per_frame: int = 0, seed: int = 0, num_frames: int | None = None,
                backend: str = "auto", max_new_tokens: int = 64, fps: float | None = None,
                max_frames: int | None = None, tower_cut: int | None = None) -> AskOptions:
    """Check and type every option that can be checked without a model (method-specific rules, such
    as which methods take --prune-after, are `vidsparse.pruning.check_method`'s). Frames are sampled
    `num_frames` to a clip (8 if neither is given) or `fps` a second of video, at most `max_frames`."""
    parse_method(method)
    if fps is not None and num_frames is not None:
        raise UserError("--frames and --fps both say how many frames to sample: give one")
    if max_frames is not None and fps is None:
        raise UserError("--max-frames caps sampling by --fps; with --frames the count is exact")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise UserError(f"--fps must be a positive number of frames a second, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {max_frames}")
    num_frames = 8 if num_frames is None else num_frames
    if positions not in POSITION_MODES:
        raise UserError(f"--positions must be authors, keep or compact, got {positions!r}")
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose auto, decord or pyav")
    for flag, value, least in (("--min-per-frame", min_per_frame, 0), ("--frames", num_frames, 1),
                               ("--max-new-tokens", max_new_tokens, 1), ("--seed", seed, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if tower_cut is not None and tower_cut < 0:
        raise UserError(f"--tower-cut must be a tower layer, 0 or more, got {tower_cut}")
    if seed > MAX_SEED:
        raise UserError(f"--seed must be at most 2**64 - 1, got {seed}")
    return AskOptions(method, parse_budget(budget), parse_layers(prune_after), positions, min_per_frame, seed,
                      num_frames, backend, max_new_tokens, fps, (max_frames or DEFAULT_MAX_FRAMES) if fps else None,
                      tower_cut)


DECODE_BATCH = 16  # questions of a clip prefilled and decoded together by default (`batch --decode-batch`)
GROUP_MB = 1024  # prepared clips held to be answered together by default (`batch --group-mb`)
