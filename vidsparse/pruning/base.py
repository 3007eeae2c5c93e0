"""What a pruning method sees and returns, and the selection helpers the methods share.

A method only *chooses*: at each stage it gets the current visual tokens (hidden states, frames,
and, if it asked for them, attention probabilities from some text rows) and returns a Selection.
The engine and `vidsparse/stage.py` do the mechanics, identically for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from vidsparse.errors import UserError
from vidsparse.models.visual import ClipGrid
from vidsparse.options import PositionMode

BEFORE_FIRST_LAYER = -1  # a stage "after layer -1" acts on the input embeddings


@dataclass(frozen=True)
class Selection:
    """The visual block after a stage, as tensors on the hidden states' device (a method that plans
    on the host sends its plan with `vidsparse.transfer.to_device`): `keep` (ascending indices into
    the current block), then one
    merged token per group: the mean of its members (`merge_source[i]` joins group
    `merge_target[i]`; a token may join several groups), weighted by `merge_weight` where given. A
    merged token takes the position and the frame/row/col of its anchor. `in_clip_order` places every
    token at its place in the clip (merged ones at their anchor's) instead of merged ones last."""

    keep: torch.Tensor
    merge_source: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    merge_target: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    merge_anchor: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    merge_weight: torch.Tensor | None = None  # (len(merge_source),) float; None: equal weights
    in_clip_order: bool = False

    @property
    def size(self) -> int:
        return int(self.keep.numel() + self.merge_anchor.numel())


@dataclass(frozen=True)
class MergeGroups:
    """Merge groups made by one part of a stage (a frame, a window): `source[i]` joins group
    `target[i]` (numbered from 0 within the part) with weight `weight[i]`; group g's anchor is
    `anchors[g]`. Indices are into the stage's whole block."""

    source: torch.Tensor
    target: torch.Tensor
    anchors: torch.Tensor
    weight: torch.Tensor


def merged_in_clip_order(keep: torch.Tensor, parts: list[MergeGroups]) -> Selection:
    """The kept tokens and every part's merge groups as one Selection in clip order, each part's
    groups numbered after those of the parts before it."""
    if not parts:
        return Selection(keep, in_clip_order=True)
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.anchors.numel())
    return Selection(keep, torch.cat([part.source for part in parts]),
                     torch.cat([part.target + offset for part, offset in zip(parts, offsets, strict=True)]),
                     torch.cat([part.anchors for part in parts]), torch.cat([part.weight for part in parts]),
                     in_clip_order=True)


@dataclass(frozen=True)
class PromptText:
    """The text around the visual block, as methods may need it (SparseVLM's raters)."""

    embeds: torch.Tensor  # (n, d) input embeddings of the whole prompt
    visual_start: int  # index of the first visual token
    num_visual: int
    suffix_start: int  # index of the first text token after the video (separators come before it)
    suffix_words: list[str]  # the text tokens from suffix_start on, as words

    @property
    def visual_end(self) -> int:
        return self.visual_start + self.num_visual


@dataclass(frozen=True)
class StageInput:
    """Everything a method may use to choose at one stage."""

    index: int  # 0-based stage number
    num_stages: int
    layer: int  # prune after this decoder layer (-1: before layer 0)
    num_visual: int  # visual tokens of the clip before any stage
    budget: int  # visual tokens after the last stage, already min(B, n)
    hidden: torch.Tensor  # (n_v, d) current visual tokens: layer output (or embeddings before layer 0)
    frames: torch.Tensor  # (n_v,) frame of each current visual token
    rows: torch.Tensor  # (n_v,) patch row of each (-1: the frame's CLS token); a merged token: its anchor's
    cols: torch.Tensor  # (n_v,) patch column of each (-1: CLS)
    attention: torch.Tensor | None  # (rows, n_v) head-averaged probabilities from the query rows
    min_per_frame: int
    generator: torch.Generator
    grid: ClipGrid  # the clip's layout before any stage (what a stage before layer 0 sees), in Python numbers
    saliency: torch.Tensor | None = None  # (n_v,) the vision tower's CLS attention to each token, if asked for
    frame_features: torch.Tensor | None = None  # (frames, d_vision) each frame's CLS embedding, if asked for
    facts: object | None = None  # what `prepare` learned about this question (None at a question-independent stage)

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


@dataclass(frozen=True)
class DecodingStep:
    """What a method that also chooses while decoding sees at one decoding step, for every question
    decoded together (one row each)."""

    attention: torch.Tensor  # (b, n_v) head-averaged attention of each new token at the method's decoding layer
    budget: int  # visual keys to keep, already min(B, n_v)
    previous: torch.Tensor | None  # (b, ...) the memory it returned at the step before (None at the first)
    frames: torch.Tensor  # (n_v,) frame of each visual key
    min_per_frame: int


class Method:
    """Base of every pruning method: where it prunes by default, which text rows it needs attention
    from, and `select`. A method object holds only its settings, so one serves every question: what it
    learns about a question (`prepare`) is a value the engine hands back to it (`StageInput.facts`,
    `query_rows`, `report`). Its name is its key in `vidsparse.options.METHOD_CLASSES`."""

    summary: ClassVar[str]
    needs_attention: ClassVar[bool] = False
    needs_saliency: ClassVar[bool] = False  # StageInput.saliency / frame_features from the vision tower
    allows_prune_after: ClassVar[bool] = True
    # Its first stage, before layer 0, depends on the clip's layout alone (`layout_stage`): it can be
    # decided before the vision tower runs and applied inside it (`--tower-cut`).
    chooses_by_layout: ClassVar[bool] = False

    def default_stages(self, num_layers: int) -> list[int]:
        raise NotImplementedError

    def reads_question(self, layer: int) -> bool:
        """Whether the stage after `layer` chooses from the question. Stages that do not are shared by
        every question about a clip (engine.prefill_head), so they must not use `prepare`'s facts;
        attention is the only question-dependent input a stage gets, and none exists before layer 0."""
        return self.needs_attention and layer > BEFORE_FIRST_LAYER

    def prepare(self, prompt: PromptText) -> object | None:
        """What the method learns about one question before its first question-reading stage (e.g. its
        raters); the engine passes it back as `facts`."""
        return None

    def query_rows(self, num_suffix: int, facts: object | None) -> range:
        """Text rows after the video (0 = first suffix token) whose attention `select` needs: a range,
        made on the device as it is (no copy)."""
        return range(num_suffix - 1, num_suffix)

    def select(self, stage: StageInput) -> Selection:
        raise NotImplementedError

    def layout_stage(self, grid: ClipGrid, budget: int) -> list[int]:
        """Ascending indices of the visual tokens its first stage keeps of a clip laid out as `grid`,
        for a method that `chooses_by_layout`: what its `select` keeps before layer 0, known before
        any token exists."""
        raise NotImplementedError

    def decoding_layer(self, num_layers: int) -> int | None:
        """The layer whose attention, at every decoding step, chooses the visual keys the new token
        sees in the layers after it (`select_while_decoding`); None: decoding sees every key the
        prefill left."""
        return None

    def select_while_decoding(self, step: DecodingStep) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, n_v) bool, the visual keys each new token sees after the decoding layer, and the memory
        handed back as `previous` at the next step (a row per question). Runs at every step: no host
        reads."""
        raise NotImplementedError

    def report(self, facts: object | None) -> dict[str, object]:
        """Extra facts for the stats (e.g. the raters chosen); `facts` is None when no stage read the
        question."""
        return {}


@dataclass(frozen=True)
class PruningPlan:
    """A method (its name and its object), the layers it prunes after (ascending; -1 = before layer 0),
    the layer whose attention chooses keys while decoding (if the method does) and the budget."""

    name: str
    method: Method
    stages: list[int]
    budget: int
    positions: PositionMode = "keep"
    min_per_frame: int = 0
    seed: int = 0
    decoding_layer: int | None = None


class BeforeFirstLayer(Method):
    """A method that prunes the input embeddings once, before layer 0, and nowhere else."""

    allows_prune_after = False

    def default_stages(self, num_layers: int) -> list[int]:
        return [BEFORE_FIRST_LAYER]


def top_k(scores: torch.Tensor, k: int, frames: torch.Tensor, min_per_frame: int = 0) -> torch.Tensor:
    """Ascending indices of the k highest scores (ties: lower index first), with at least
    `min_per_frame` tokens (or all it has) from every frame: the first k of the ranking with each
    frame's best `min_per_frame` moved to the front."""
    k = min(k, scores.numel())
    order = torch.sort(-scores.float(), stable=True).indices
    if min_per_frame <= 0:
        return order[:k].sort().values
    ranked_frames = frames[order]
    later = rank_in_frame(ranked_frames) >= min_per_frame
    return order[torch.sort(later.to(torch.uint8), stable=True).indices[:k]].sort().values


def rank_in_frame(ranked_frames: torch.Tensor) -> torch.Tensor:
    """For tokens in ranked order (their frames given), each one's place among its own frame's
    tokens (0 = its frame's first): a stable sort groups the frames keeping the ranking, and each
    token's place is its distance from its group's start. No loop over frames, no device sync, O(n)
    memory however many frames."""
    grouped, order = torch.sort(ranked_frames, stable=True)
    rank = torch.empty_like(ranked_frames)
    rank[order] = torch.arange(grouped.numel(), device=grouped.device) - torch.searchsorted(grouped, grouped)
    return rank


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`: floors, then +1 to the largest fractions (ties: first)."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [math.floor(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))[: total - sum(shares)]:
        shares[i] += 1
    return shares


def check_floor(budget: int, num_frames: int, min_per_frame: int) -> None:
    """The per-frame floor must fit in the budget."""
    if min_per_frame * num_frames > budget:
        raise UserError(f"--min-per-frame {min_per_frame} x {num_frames} frames needs a budget of at least "
                        f"{min_per_frame * num_frames}, got {budget}")


def for_products(x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype its similarity products are taken in: the model's (bfloat16 products are several
    times cheaper than float32 ones: AMX, tensor cores; a float32 model keeps float32), but float16
    through bfloat16, whose range holds the squared norms and sums of products of large states (float16's
    ends at 65504)."""
    return x.to(torch.bfloat16) if x.dtype == torch.float16 else x


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """Every token (along the last dimension) normalised to length 1, in `for_products`' dtype."""
    return F.normalize(for_products(x), dim=-1)


def unit_rows(x: torch.Tensor, columns: torch.Tensor | None = None, rows: int = 256) -> torch.Tensor:
    """Every token (restricted to `columns`, if given) normalised to length 1, in float32, by row
    chunks written into the result: one float32 copy, no further n x d temporaries (on a CPU those cost
    more than the scoring or merging that needs the unit vectors); the columns are taken before the
    conversion."""
    out = torch.empty(x.shape[0], x.shape[1] if columns is None else columns.numel(), device=x.device)
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        F.normalize((chunk if columns is None else chunk[:, columns]).float(), dim=1, out=out[start : start + rows])
    return out
