"""SparseVLM (SPEC section 4): text raters, rank-adaptive deletion, token recycling with DPC-kNN.

Deviations from the official code, on purpose: clustering is deterministic (ties broken by index
instead of random noise on the density); the last stage lands exactly on the budget B (kept +
recycled); attention rows are computed for the raters only, never the full n x n matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vidsparse.pruning.base import Method, PromptText, Selection, StageInput, top_k
from vidsparse.pruning.clustering import dpc_knn

RECYCLE_FRACTION = 0.3  # tau: the best-scored 30% (+ 1) of the deleted tokens are recycled
TOKENS_PER_CLUSTER = 10  # theta = 0.1: one cluster per 10 recycled tokens, plus one
DELETION_RATE = 0.5  # lambda: intermediate stages delete lambda * (Lv - rank(P))


def choose_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Which text rows rate the visual tokens, as a mask: M = softmax over text of V T^T (unscaled),
    r_j = mean over visual rows of M[:, j]; raters are j with r_j > mean(r), every row if none is.
    A mask rather than indices: how many raters there are stays on the device."""
    # The product in the model's dtype (as the official code does; no fp32 copy of all visual
    # tokens), the softmax in fp32.
    relevance = torch.softmax((visual @ text.T).float(), dim=1).mean(0)
    raters = relevance > relevance.mean()
    return raters | ~raters.any()


def raters_mean(attention: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """The mean of the raters' rows of `attention` (one row per text row, raters a mask over them)."""
    weight = raters.to(attention.dtype)
    return weight @ attention / weight.sum()


def recycling_split(target: int, num_visual: int) -> tuple[int, int]:
    """(kept K, clusters C) with K + C = target, C = floor(|pool| / 10) + 1 where the pool is the best
    int(30% of the num_visual - K deleted tokens) + 1 (none deleted: no pool, no clusters). C grows by
    at most one when K shrinks by one, so the smallest C that satisfies the rule is exact, unless the
    budget is too small to hold every cluster: then C = target."""
    if target >= num_visual:
        return num_visual, 0
    for clusters in range(target + 1):
        if num_clusters(num_visual - (target - clusters)) <= clusters:
            return target - clusters, clusters
    return 0, target


def pool_size(deleted: int) -> int:
    """The official code's (and LightCompress's) pool: int(tau * deleted) + 1 of the deleted tokens."""
    return int(deleted * RECYCLE_FRACTION) + 1 if deleted else 0


def num_clusters(deleted: int) -> int:
    pool = pool_size(deleted)
    return pool // TOKENS_PER_CLUSTER + 1 if pool else 0


def keep_and_recycle(stage: StageInput, scores: torch.Tensor, target: int, in_clip_order: bool = False,
                     choose: Callable[[int], torch.Tensor] | None = None) -> Selection:
    """SparseVLM's token recycling, landing on `target`: keep K tokens (the best K by `scores`, or
    `choose(K)`); the best-scored deleted ones (the pool) become C DPC-kNN cluster means; K + C = target.
    A per-frame floor counts kept tokens only, so K is at least the floor's total (C shrinks)."""
    kept_count, clusters = recycling_split(target, scores.numel())
    floor = min(target, stage.min_per_frame * stage.grid.frames)
    if kept_count < floor:
        kept_count, clusters = floor, target - floor
    keep = choose(kept_count) if choose else top_k(scores, kept_count, stage.frames, stage.min_per_frame)
    if clusters == 0:
        return Selection(keep, in_clip_order=in_clip_order)
    deleted_ids = complement(keep, scores.numel())
    pool_count = max(pool_size(deleted_ids.numel()), clusters)
    pool = deleted_ids[torch.sort(-scores[deleted_ids].float(), stable=True).indices[:pool_count]]
    centres, assignment = dpc_knn(stage.hidden.index_select(0, pool), clusters)
    return Selection(keep, pool, assignment, pool[centres], in_clip_order=in_clip_order)


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending indices in 0..n-1 that `keep` (distinct indices) lacks; its size is known on the host,
    so no device sync (`nonzero` would wait for the device to learn the size)."""
    kept = torch.zeros(n, dtype=torch.uint8, device=keep.device).index_fill_(0, keep, 1)
    return torch.sort(kept, stable=True).indices[: n - keep.numel()]


@dataclass
class Raters:
    """What SparseVLM learns about one question: which text tokens rate the visual ones (a mask over
    the suffix rows, whose words are `words`), and the rank of each intermediate stage's attention."""

    mask: torch.Tensor
    words: list[str]
    ranks: list[int] = field(default_factory=list)

    def rater_words(self) -> list[str]:
        """The raters as words, for the report: read after the answer, not while pruning."""
        return [word for word, rates in zip(self.words, self.mask.tolist(), strict=True) if rates]


class RatedByText(Method):
    """A method whose attention rows include SparseVLM's text raters, chosen once per prompt. It asks
    for every suffix row's attention and averages the raters' among them."""

    needs_attention = True

    def prepare(self, prompt: PromptText) -> Raters:
        visual = prompt.embeds[prompt.visual_start : prompt.visual_end]
        return Raters(choose_raters(visual, prompt.embeds[prompt.suffix_start :]), prompt.suffix_words)

    def query_rows(self, num_suffix: int, facts: Raters) -> range:
        return range(num_suffix)

    def report(self, facts: Raters | None) -> dict[str, object]:
        return {"raters": " ".join(facts.rater_words()) if facts else ""}


class SparseVLM(RatedByText):
    summary = ("text raters score visual tokens; rank-adaptive deletion per stage; the best deleted "
               "tokens are recycled into DPC-kNN cluster means; kept + recycled = B")

    def default_stages(self, num_layers: int) -> list[int]:
        return [1]  # the official video branch: one stage at layer index 1

    def stage_size(self, stage: StageInput) -> int:
        """Intermediate stages delete floor(lambda * (Lv - rank P)) but never go below B."""
        if stage.is_last:
            return stage.budget
        num_visual = stage.frames.numel()
        # The one value read from the device on purpose: it sizes the stage (only with several stages).
        rank = int(torch.linalg.matrix_rank(stage.attention.float() * stage.facts.mask[:, None]))
        stage.facts.ranks.append(rank)
        deleted = int(DELETION_RATE * (num_visual - rank))
        return max(stage.budget, num_visual - deleted)

    def select(self, stage: StageInput) -> Selection:
        return keep_and_recycle(stage, raters_mean(stage.attention, stage.facts.mask), self.stage_size(stage))

    def report(self, facts: Raters | None) -> dict[str, object]:
        return {**super().report(facts), "ranks": facts.ranks if facts else []}
