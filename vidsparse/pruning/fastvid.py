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
- Budget: each segment gets its largest-remainder share of B by token count; 40% of it (rounded)
  is context (merged anchors), split over the anchor frames (the last frame of the segment and every
  4th before it; remainder to those nearest the end), the rest salient tokens split over the
  segment's frames (remainder to the earliest). Context that does not fit an anchor frame becomes
  salient tokens elsewhere in the segment, so the total is B exactly.
- Anchors: per anchor frame, DPC-kNN (4 neighbours, itself included; ties broken by index instead of
  random noise) over its non-salient tokens picks the anchors. Every non-salient token of the segment
  (anchors included) joins its most cosine-similar anchor; a merged anchor is
  0.6 * anchor + 0.4 * mean(its members) (the parallel version of the official code and LightCompress;
  with several anchor frames the segment is merged into each anchor set separately).
- Output in clip order, every token at its own (a merged token: its anchor's) position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vidsparse.errors import UserError
from vidsparse.pruning.base import BeforeFirstLayer, Selection, StageInput, unit_rows
from vidsparse.pruning.clustering import dpc_knn

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
        if stage.min_per_frame:
            raise UserError("fastvid sets its own per-frame counts; --min-per-frame does not apply to it")
        num_frames = stage.frame_features.shape[0]
        unit = unit_rows(stage.hidden)
        keep, source, target, anchors, weights = [], [], [], [], []
        for frames, budget in zip(*segment_budgets(stage.frame_features, stage.budget,
                                                   torch.bincount(stage.frames, minlength=num_frames).tolist()),
                                  strict=True):
            salient_counts, context_counts = split_segment(budget, len(frames), per_frame_tokens(stage, frames))
            salient = {f: salient_tokens(stage, f, count) for f, count in zip(frames, salient_counts, strict=True)}
            keep += [i for f in frames for i in salient[f].tolist()]
            others = torch.cat([frame_tokens(stage, f)[~torch.isin(frame_tokens(stage, f), salient[f])]
                                for f in frames])
            for f, count in zip(frames, context_counts, strict=True):
                if not count:
                    continue
                pool = frame_tokens(stage, f)[~torch.isin(frame_tokens(stage, f), salient[f])]
                centres, _ = dpc_knn(stage.hidden[pool], count, NEIGHBOURS)
                members, group, weight = merge_into(unit, others, pool[centres])
                source.append(members)
                target.append(group + len(anchors))
                weights.append(weight)
                anchors += pool[centres].tolist()
        device = stage.hidden.device
        if not anchors:
            return Selection(torch.tensor(sorted(keep), dtype=torch.long, device=device), in_clip_order=True)
        return Selection(torch.tensor(sorted(keep), dtype=torch.long, device=device), torch.cat(source),
                         torch.cat(target), torch.tensor(anchors, dtype=torch.long, device=device),
                         torch.cat(weights), in_clip_order=True)


def frame_tokens(stage: StageInput, frame: int) -> torch.Tensor:
    return (stage.frames == frame).nonzero().squeeze(1)


def per_frame_tokens(stage: StageInput, frames: list[int]) -> int:
    return int((stage.frames == frames[0]).sum())


def segment_budgets(frame_features: torch.Tensor, budget: int, sizes: list[int]) -> tuple[list[list[int]], list[int]]:
    """DySeg's segments (lists of frames) and each one's largest-remainder share of the budget."""
    num_frames = frame_features.shape[0]
    similarity = F.cosine_similarity(frame_features[:-1].float(), frame_features[1:].float(), dim=-1)
    cuts = set(torch.sort(similarity, stable=True).indices[: max(1, num_frames // 4) - 1].tolist())
    cuts |= set((similarity < SIMILARITY_CUT).nonzero().squeeze(1).tolist())
    segments, start = [], 0
    for t in sorted(cuts) + [num_frames - 1]:
        segments.append(list(range(start, t + 1)))
        start = t + 1
    tokens = [sum(sizes[f] for f in segment) for segment in segments]
    return segments, largest_remainder(budget, tokens)


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`: floors, then +1 to the largest fractions (ties: first)."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [math.floor(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))[: total - sum(shares)]:
        shares[i] += 1
    return shares


def split_segment(budget: int, length: int, per_frame: int) -> tuple[list[int], list[int]]:
    """(salient tokens per frame, context tokens per frame) of a segment: the counts add up to `budget`."""
    anchor_frames = [j for j in range(length) if (length - 1 - j) % ANCHOR_STRIDE == 0]  # from the end
    context = round(budget * CONTEXT_SHARE)
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


def salient_tokens(stage: StageInput, frame: int, count: int) -> torch.Tensor:
    """The frame's `count` most salient tokens by the tower's CLS attention, CLS itself first."""
    tokens = frame_tokens(stage, frame)
    score = torch.where(stage.rows[tokens] < 0, math.inf, stage.saliency[tokens].float())
    return tokens[torch.sort(-score, stable=True).indices[:count]]


def merge_into(unit: torch.Tensor, members: torch.Tensor, anchors: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each member joins its most cosine-similar anchor (ties: the first); ``unit``: the tokens
    normalised. Returns (source, group, weight) whose weighted group means are w * anchor + (1 - w) *
    mean(members joined), with w = max(1 / (count + 1), 0.6): the anchor itself is one more source of
    its own group."""
    group = (unit[anchors] @ unit[members].T).argmax(0)
    counts = torch.bincount(group, minlength=anchors.numel()).float()
    own = torch.maximum(1 / (counts + 1), torch.tensor(ANCHOR_WEIGHT))
    return (torch.cat([members, anchors]), torch.cat([group, torch.arange(anchors.numel(), device=unit.device)]),
            torch.cat([(1 - own[group]) / counts[group], own]))
