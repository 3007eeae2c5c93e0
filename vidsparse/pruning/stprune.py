"""stprune, vidsparse's own method: a question-independent spatio-temporal cover of the clip before
layer 0, then a question-guided, redundancy-aware choice after layer 1 that lands exactly on B.

Why this shape (measured on ShapesQA tuning clips, never on the held-out sets; docs/methods.md "stprune"):
- Coverage beats saliency before the LLM. A 2-D lattice per frame, shifted from frame to frame, keeps
  every moment and, across frames, every part of the image; selecting the tokens most distinct from
  the clip's background (or the most feature-diverse ones) loses far more (count questions fall to
  chance: the model reads how many things there are from tokens spread over the image).
- The question's evidence helps after the first layers, but a plain top-k by attention piles its
  picks onto the one object the question token looks at and drops the others (FastV and SparseVLM
  lose count questions). So stage 2 picks by maximal marginal relevance: relevance = attention from
  the question's raters (SparseVLM's text raters) and from the last prompt token (FastV's signal),
  each normalised to sum 1 and averaged; a candidate's gain is its relevance (scaled to [0, 1]) minus
  its highest cosine similarity (layer-1 states) to a token already picked.

Stage 1 (before layer 0, depends on the video only, so it can be computed once per clip): the
`uniform` lattice to M = min(n, 2 B) tokens (SUMMARY_FACTOR).
Stage 2 (after layer 1): K tokens by maximal marginal relevance; the best deleted ones are recycled
into C density-peak cluster means (SparseVLM's rule), K + C = B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vidsparse.errors import UserError
from vidsparse.models.visual import ClipGrid
from vidsparse.pruning.base import BEFORE_FIRST_LAYER, Selection, StageInput
from vidsparse.pruning.baselines import lattice
from vidsparse.pruning.sparsevlm import RatedByText, keep_and_recycle, raters_mean
from vidsparse.transfer import to_device

SUMMARY_FACTOR = 2.0  # stage 1 keeps this many times B: layers 0-1 see them
QUESTION_LAYER = 1  # stage 2 prunes after this decoder layer
RATER_WEIGHT = 0.5  # share of the raters' evidence in the relevance (the rest: the last prompt token)
REDUNDANCY_WEIGHT = 1.0  # how much similarity to a token already picked costs


class STPrune(RatedByText):
    summary = ("vidsparse's own: a spatio-temporal lattice of 2B tokens before layer 0 (question-independent), "
               "then question relevance minus redundancy, with recycling, to exactly B after layer 1")
    allows_prune_after = False
    chooses_by_layout = True

    def default_stages(self, num_layers: int) -> list[int]:
        return [BEFORE_FIRST_LAYER, min(QUESTION_LAYER, num_layers - 2)]

    def select(self, stage: StageInput) -> Selection:
        if stage.min_per_frame:
            raise UserError("stprune keeps every frame in its first stage; --min-per-frame does not apply to it")
        if stage.layer == BEFORE_FIRST_LAYER:
            return Selection(to_device(self.layout_stage(stage.grid, stage.budget), stage.hidden.device),
                             in_clip_order=True)
        relevance = question_relevance(stage.attention, stage.facts.mask)
        return keep_and_recycle(stage, relevance, stage.budget, in_clip_order=True,
                                choose=lambda k: diverse_top_k(relevance, stage.hidden, k, REDUNDANCY_WEIGHT))


    def layout_stage(self, grid: ClipGrid, budget: int) -> list[int]:
        num_visual = grid.frames * grid.per_frame
        return lattice(grid, min(num_visual, max(budget, math.ceil(SUMMARY_FACTOR * budget))))


def question_relevance(attention: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Rows: every text row after the video, the last being the last prompt token; `raters` marks the
    raters among them. Each evidence (the raters' mean, the last token's row) normalised to sum 1,
    then mixed."""
    raters, last = raters_mean(attention, raters), attention[-1]
    return RATER_WEIGHT * raters / raters.sum() + (1 - RATER_WEIGHT) * last / last.sum()


def diverse_top_k(relevance: torch.Tensor, features: torch.Tensor, k: int, weight: float) -> torch.Tensor:
    """Ascending indices of k tokens picked greedily by maximal marginal relevance: relevance scaled
    to [0, 1], minus `weight` x the highest cosine similarity (clamped at 0) of the candidate's
    features to any token already picked. Ties: the lower index. The similarities come from one
    product, in the features' dtype (the model's: bfloat16 on a GPU, where float32 would cost several
    times more). Each pick is two vector operations that never wait for the device: with weight >= 0,
    s - weight x max(r, q) = min(s - weight x r, s - weight x q), exactly (rounding is monotone), so the
    gains after a pick are their minimum with the pick's row of score - weight x similarity, whose
    diagonal is -inf: a pick's own gain falls out with it."""
    if weight < 0:
        raise ValueError(f"the redundancy weight must be >= 0, got {weight}")
    low, span = relevance.min(), relevance.max() - relevance.min()
    score = torch.where(span > 0, (relevance - low) / span, 0.0).float()[None]  # (1, m)
    unit = F.normalize(features, dim=1)
    similarity = (unit @ unit.T).float().clamp_min_(0)
    # [i, j]: j's gain once i is picked, in place (one m x m matrix): score - weight x similarity rounded
    # twice, as two operations round it (a fused multiply-add would round once)
    after_pick = similarity.mul_(-weight).add_(score)
    after_pick.diagonal().fill_(-torch.inf)
    gain = score.clone()
    picked = []
    for _ in range(min(k, score.numel())):
        best = gain.argmax(1)
        picked.append(best)
        torch.minimum(gain, after_pick.index_select(0, best), out=gain)
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long, device=relevance.device)
