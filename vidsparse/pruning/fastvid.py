"""FastVID (Shen et al., NeurIPS 2025; official code LunarShen/FastVID, LightCompress's port): before
layer 0, cut the clip into segments of similar frames, keep each frame's most salient tokens, and
merge the rest of a segment into density-peak anchors of its anchor frames.

Adapted to VideoLLaVA's CLIP tower and to an exact budget (../shared/PEERS.md):
- Frame feature f_t: the CLS state of the tower's feature layer after its final norm; token
  saliency a_t: that layer's CLS-query attention over the frame (FastVID reads SigLIP's pooling head,
  which CLIP lacks). The CLS token itself is always the first of a frame's salient tokens.
- Segments: cuts after the c - 1 least similar adjacent pairs, and wherever cos(f_t, f_t+1) < 0.9;
  c = max(1, T // 4) (the paper's 32 frames in 8 segments; its default c = 8 would make every one
  of 8 frames its own segment and the cross-frame merging inert).
- Budget: each segment gets its largest-remainder share of B by token count; 40% of it (rounded
  down, as the official code's int()) is context (merged anchors), split over the anchor frames (the
  last frame of the segment and every 4th before it; remainder to those nearest the end), the rest
  salient tokens split over the segment's frames (remainder to the earliest). Context that does not
  fit an anchor frame becomes salient tokens elsewhere in the segment, so the total is B exactly.
- Anchors: per anchor frame, DPC-kNN (4 neighbours, itself included; ties broken by index instead of
  random noise) over its non-salient tokens picks the anchors. Every non-salient token of the segment
  (anchors included) joins its most cosine-similar anchor; a merged anchor is
  0.6 * anchor + 0.4 * mean(its members) (the parallel version of the official code and LightCompress;
  with several anchor frames the segment is merged into each anchor set separately).
- Output in clip order, every token at its own (a merged token: its anchor's) position.
- The member-to-anchor cosines are products in the model's dtype, as the original's; DPC-kNN's
  distances too (the original: a float32 cdist), so on a bfloat16 model near-equal density
  candidates can go the other way. float16 goes through bfloat16, whose range holds the products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vidsparse.errors import UserError
from vidsparse.pruning.base import (
    BeforeFirstLayer,
    MergeGroups,
    Selection,
    StageInput,
    for_products,
    largest_remainder,
    merged_in_clip_order,
    unit_vectors,
)
from vidsparse.pruning.clustering import dpc_knn_groups

SIMILARITY_CUT = 0.9  # tau: adjacent frames less similar than this are always cut
CONTEXT_SHARE = 0.4  # d: share of a segment's tokens that are merged context
ANCHOR_STRIDE = 4  # p: every 4th frame from the segment's end is an anchor frame
ANCHOR_WEIGHT = 0.6  # beta: weight of the anchor itself in its merged token
NEIGHBOURS = 4  # k of the density estimate


class FastVID(BeforeFirstLayer):
    summary = ("FastVID: segments of similar frames; per frame the most salient tokens, the rest of a segment "
               "merged into density-peak anchors (before layer 0)")
    needs_saliency = True

    def select(self, stage: StageInput) -> Selection:
        """The segments and every count are planned on the host from T - 1 frame similarities (the one
        read from the device); the tokens are then chosen on the device without waiting for it."""
        if stage.min_per_frame:
            raise UserError("fastvid sets its own per-frame counts; --min-per-frame does not apply to it")
        grid, hidden = stage.grid, stage.hidden
        per_frame = grid.per_frame
        ranked = salience_order(stage)
        keep, merging = [], []
        for frames, budget in zip(*segment_budgets(stage.frame_features, stage.budget, per_frame), strict=True):
            salient_counts, context_counts = split_segment(budget, len(frames), per_frame)
            keep += [ranked[f, :count] for f, count in zip(frames, salient_counts, strict=True)]
            if any(context_counts):
                merging.append((frames, salient_counts, context_counts))
        # each merging frame's pool: its tokens past the salient ones, ascending (sizes known here)
        pools = {f: (ranked[f, salient:].sort().values, per_frame - salient)
                 for frames, salient_counts, _ in merging for f, salient in zip(frames, salient_counts, strict=True)}
        clustered = [(f, count) for frames, _, context_counts in merging
                     for f, count in zip(frames, context_counts, strict=True) if count]
        anchors = dict(zip([f for f, _ in clustered], pool_anchors(hidden, pools, clustered), strict=True))
        parts = []
        for frames, _, context_counts in merging:
            members = torch.cat([pools[f][0] for f in frames])
            first = frames[0] * per_frame
            # the segment's tokens are consecutive: products with all of them, read in place, then the
            # members' columns (the cosine argmax over anchors needs no member norms)
            segment = for_products(hidden[first : (frames[-1] + 1) * per_frame])
            for f, count in zip(frames, context_counts, strict=True):
                if not count:
                    continue
                chosen = anchors[f]
                similarity = unit_vectors(hidden.index_select(0, chosen)) @ segment.T
                group, weight = merge_into(similarity.float()[:, members - first])
                parts.append(MergeGroups(torch.cat([members, chosen]),
                                         torch.cat([group, torch.arange(count, device=hidden.device)]), chosen, weight))
        return merged_in_clip_order(torch.cat(keep).sort().values, parts)


def pool_anchors(hidden: torch.Tensor, pools: dict[int, tuple[torch.Tensor, int]],
                 clustered: list[tuple[int, int]]) -> list[torch.Tensor]:
    """For each (frame, count): `count` anchors, the density peaks of the frame's pool (its indices and
    their number), as clip indices; every frame's in one batch (`dpc_knn_groups`)."""
    if not clustered:
        return []
    sizes = [pools[f][1] for f, _ in clustered]
    index = torch.stack([F.pad(pools[f][0], (0, max(sizes) - size)) for (f, _), size in zip(clustered, sizes,
                                                                                             strict=True)])
    pooled = hidden.index_select(0, index.flatten()).view(*index.shape, -1)  # index_select: hidden[index] is slower
    found = dpc_knn_groups(pooled, sizes, [count for _, count in clustered], [NEIGHBOURS] * len(clustered))
    # `count` anchors each: a frame's pool holds at least that many
    return [pools[f][0][centres] for (f, _), (centres, _) in zip(clustered, found, strict=True)]


def salience_order(stage: StageInput) -> torch.Tensor:
    """(T, per frame): each frame's tokens (clip indices), most salient first by the tower's CLS
    attention, CLS itself first; ties: the lower index."""
    grid = stage.grid
    score = torch.where(stage.rows < 0, math.inf, stage.saliency.float()).view(grid.frames, grid.per_frame)
    order = torch.sort(-score, dim=1, stable=True).indices
    return order + grid.per_frame * torch.arange(grid.frames, device=order.device)[:, None]


def segment_budgets(frame_features: torch.Tensor, budget: int, per_frame: int) -> tuple[list[list[int]], list[int]]:
    """DySeg's segments (lists of frames) and each one's largest-remainder share of the budget. The
    T - 1 adjacent similarities are read to the host once: the plan is made of Python numbers."""
    num_frames = frame_features.shape[0]
    similarity = F.cosine_similarity(frame_features[:-1].float(), frame_features[1:].float(), dim=-1).tolist()
    cuts = set(sorted(range(num_frames - 1), key=lambda i: similarity[i])[: max(1, num_frames // 4) - 1])
    cuts |= {i for i, value in enumerate(similarity) if value < SIMILARITY_CUT}
    segments, start = [], 0
    for t in sorted(cuts) + [num_frames - 1]:
        segments.append(list(range(start, t + 1)))
        start = t + 1
    return segments, largest_remainder(budget, [per_frame * len(segment) for segment in segments])


def split_segment(budget: int, length: int, per_frame: int) -> tuple[list[int], list[int]]:
    """(salient tokens per frame, context tokens per frame) of a segment: the counts add up to `budget`."""
    anchor_frames = [j for j in range(length) if (length - 1 - j) % ANCHOR_STRIDE == 0]  # from the end
    context = int(budget * CONTEXT_SHARE)  # the official code's int(), not round()
    salient = [(budget - context) // length + (1 if j < (budget - context) % length else 0) for j in range(length)]
    near_end_first = sorted(anchor_frames, reverse=True)
    contexts = [0] * length
    for rank, j in enumerate(near_end_first):
        contexts[j] = context // len(anchor_frames) + (1 if rank < context % len(anchor_frames) else 0)
    overflow = 0
    for j in anchor_frames:  # an anchor frame has only per_frame - salient tokens to merge into anchors
        spill = max(0, contexts[j] - (per_frame - salient[j]))
        contexts[j] -= spill
        overflow += spill
    for j in range(length):  # what did not fit becomes salient tokens wherever a frame has room
        room = per_frame - salient[j] - contexts[j]
        salient[j] += min(room, overflow)
        overflow -= min(room, overflow)
    return salient, contexts


def merge_into(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From (anchors, members) similarities, each member's group (its most similar anchor; ties: the
    first) and the weights whose weighted group means are w * anchor + (1 - w) * mean(members joined),
    w = max(1 / (count + 1), 0.6): returns (member groups, member weights ++ anchor weights), the
    anchor itself being one more source of its own group."""
    anchors = similarity.shape[0]
    group = similarity.argmax(0)
    counts = torch.zeros(anchors, device=group.device).index_add_(0, group, torch.ones_like(group, dtype=torch.float))
    own = (1 / (counts + 1)).clamp_min(ANCHOR_WEIGHT)
    return group, torch.cat([(1 - own[group]) / counts[group], own])
