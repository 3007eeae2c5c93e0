"""FlashVID (Fan et al., ICLR 2026; official code Fanziyang-v/FlashVID, `flashvid/utils.py`,
`flashvid/token_selection.py`): before the LLM, per segment of similar frames, each frame keeps
tokens chosen for attention *and* diversity, and the rest of the segment is merged along trees across
time and then by density peaks in space; inside the LLM, the last prompt token's attention keeps the
final share.

- Segments (DySeg): cuts where the cosine of adjacent frames' mean tokens is under 0.9; when that
  gives fewer than the minimum number of segments, more cuts at the least similar remaining pairs.
- ADTS (the wrapper's default `attn_div_v2`), per frame: the distance between tokens i and j is
  (1 - cos(x_i, x_j)) * a_j * r_j, with a_j the tower's saliency and r_j = x_j . (mean token of the
  segment); the first pick is the token whose nearest neighbour is farthest, then greedily the token
  farthest from those picked (max-min). 70% of a frame's share (rounded up) is chosen so.
- TSTM, the rest of the segment: every other token of frame t links to its most similar other token
  of frame t - 1 and is merged into it when the cosine exceeds 0.8, so that links form trees rooted
  at tokens that merged into nothing (at most as many merges as leave the segment its share);
  each tree becomes the mean of its tokens. Then, per frame, the trees rooted there are merged by
  density peaks (DPC-kNN, k = min(clusters, 7)) into the frame's share of the segment's remaining
  count, each cluster the plain mean of its trees' means, at the centre's place.
- Inside the LLM, before layer 20 of Qwen2-7B's 28 (scaled to the decoder's depth), the visual tokens
  the last prompt token attends to most in the layer before stay (30% of them).

Adapted to the exact budget and to vidsparse's families (../shared/PEERS.md):
- B is what the inner stage leaves; the stage before layer 0 leaves min(n, round(B / 0.3)) (the
  original's vision side keeps r x 1.25 of the tokens and the LLM 30% of those, so that the
  layer-averaged share is r; here B counts what the last layers see, as for every method).
- Frames' shares of that count by largest remainder (the original rounds each frame up); a
  segment's remaining count is split over its frames in proportion to the trees rooted in each
  (the original rounds each frame's clusters up), and at most (other tokens - that count) merges
  happen across time, the most similar links first (the original lowers its threshold to the
  nearest similarity, which can keep one token too many).
- Minimum segments max(1, T // 4): the paper's 8 for 32 frames (8 for 8 frames would make every frame
  a segment and the merging across time inert).
- A tree is the mean of all its tokens (the official code divides a chain's sum by the number of
  direct links only, which weighs the deeper tokens more than a mean would).
- A one-frame segment merges only its unpicked tokens, as every longer segment does (the original
  clusters all of such a frame's tokens, the picked ones too, so that a token can be kept twice).
- Similarities and density-peak distances are products in the model's dtype (the tokens' products
  scaled by their inverse norms, the norms in that dtype too; `clustering.dpc_knn_groups`; the original:
  float32 unit vectors; float16 goes through bfloat16), so on a bfloat16 model a similarity within
  ~0.004 of a threshold, or near-equal candidates, can go the other way.
- Picked tokens are excluded from later picks explicitly (`attn_div_v2` relies on their distance
  to themselves being 0); ties are broken by index, density ties by index instead of random noise.
- Saliency is the family's (`StageInput.saliency`): the attention each token receives in the tower's
  feature layer (OneVision, Qwen2.5-VL: FlashVID's own mean over heads and queries) or, on CLIP
  (VideoLLaVA), the CLS query's attention. A CLS token is a token like any other.
- Output in clip order. Positions (`--positions authors`, the default): renumbered after each stage
  on a 1-D RoPE model, as the original renumbers the vision side's tokens (its inner stage keeps the
  gaps, `compact` closes them); kept (3-D) on Qwen2.5-VL, as its Qwen code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vidsparse.errors import UserError
from vidsparse.models.visual import ClipGrid
from vidsparse.pruning.attention_scored import FastV
from vidsparse.pruning.base import BEFORE_FIRST_LAYER, Selection, StageInput, for_products, largest_remainder
from vidsparse.pruning.clustering import dpc_knn_groups
from vidsparse.transfer import to_device

SEGMENT_CUT = 0.9  # adjacent frames less similar than this are always cut
FRAMES_PER_SEGMENT = 4  # the paper's 32 frames in at least 8 segments
SELECTED_SHARE = 0.7  # alpha: a frame's share chosen by ADTS (rounded up)
TEMPORAL_CUT = 0.8  # a token merges into its match in the frame before above this cosine
NEIGHBOURS = 7  # k of the density estimate (at most the number of clusters)
INNER_LAYER, REFERENCE_DEPTH = 20, 28  # pruning_layer on Qwen2-7B's 28 layers
INNER_KEEP_SHARE = 0.3  # llm_retention_ratio


class FlashVID(FastV):
    """Its inner stage is FastV's at FlashVID's layer."""

    summary = ("FlashVID: per segment of similar frames, tokens chosen for attention and diversity, the rest merged "
               "along trees across frames and by density peaks (before layer 0, B / 0.3); the last prompt "
               "token's attention keeps B (at 20/28 depth)")
    needs_saliency = True
    allows_prune_after = False

    def default_stages(self, num_layers: int) -> list[int]:
        inner = round(num_layers * INNER_LAYER / REFERENCE_DEPTH) - 1  # prune after the layer before
        return [BEFORE_FIRST_LAYER, min(max(0, inner), num_layers - 2)]

    def select(self, stage: StageInput) -> Selection:
        if stage.min_per_frame:
            raise UserError("flashvid merges tokens across frames; --min-per-frame does not apply to it")
        if stage.layer == BEFORE_FIRST_LAYER:
            count = min(stage.num_visual, round(stage.budget / INNER_KEEP_SHARE))
            return compress_clip(stage.hidden, stage.saliency, stage.grid, count)
        return super().select(stage)


def compress_clip(hidden: torch.Tensor, saliency: torch.Tensor, grid: ClipGrid, count: int) -> Selection:
    """The stage before layer 0: `count` tokens, ADTS picks kept and the rest merged along trees and
    by density peaks. Planned on the host from two reads a clip: the T - 1 frame similarities (the
    segments) and the trees rooted in each frame (the clusters)."""
    frames, places = grid.frames, grid.per_frame
    device = hidden.device
    if count >= frames * places:
        return Selection(torch.arange(frames * places, device=device), in_clip_order=True)
    tokens = for_products(hidden.view(frames, places, -1))
    # cosines as products of the tokens themselves scaled by their inverse norms: no n x d copy of unit
    # vectors (on a CPU each fresh n x d temporary costs more than the products that use it)
    # (norms in the tokens' dtype: asking for float32 would convert every token first)
    inverse_norms = torch.linalg.vector_norm(tokens, dim=-1).float().clamp_min(1e-12).reciprocal()
    # a product with ones: several times faster than a mean over the middle dimension on a CPU
    frame_means = (torch.full((frames, 1, places), 1 / places, dtype=tokens.dtype, device=device) @ tokens)
    frame_means = frame_means.squeeze(1).float()
    segments = cut_segments(frame_means)
    shares = largest_remainder(count, [places] * frames)
    picked_counts = [min(share, math.ceil(share * SELECTED_SHARE)) for share in shares]
    segment_of = to_device([i for i, segment in enumerate(segments) for _ in segment], device)
    segment_means = torch.stack([frame_means[segment[0] : segment[-1] + 1].mean(0) for segment in segments])
    picked = adts_order(tokens, inverse_norms, saliency.float().view(frames, places), segment_means[segment_of],
                        max(picked_counts))
    is_picked = torch.zeros(frames, places, dtype=torch.bool, device=device)
    for frame, wanted in enumerate(picked_counts):
        is_picked[frame, picked[frame, :wanted]] = True
    roots = torch.arange(frames * places, device=device).view(frames, places)
    rests = [sum(shares[t] - picked_counts[t] for t in segment) for segment in segments]  # merged tokens each
    linked = False  # whether any segment links tokens across time (else every tree is one token)
    for segment, rest in zip(segments, rests, strict=True):
        others = sum(places - picked_counts[t] for t in segment)
        span = slice(segment[0], segment[-1] + 1)
        roots[span] = merge_across_time(tokens[span], inverse_norms[span], is_picked[span], roots[span], others - rest)
        linked |= len(segment) > 1 and others > rest
    flat_roots, flat_picked = roots.flatten(), is_picked.flatten()
    own = torch.arange(frames * places, device=device)
    is_root = (flat_roots == own) & ~flat_picked
    trees_in = is_root.view(frames, places).sum(1).tolist()  # the one read for the clusters
    # what the clustering compares, summed in the model's dtype (the merged tokens are made exactly, later)
    tree_sums, tree_size = tokens.view(frames * places, -1), torch.ones(frames * places, device=device)
    if linked:
        tree_size = torch.zeros_like(tree_size).index_add_(0, flat_roots, tree_size)
        tree_sums = torch.zeros_like(tree_sums).index_add_(0, flat_roots, tree_sums)
    frame_clusters = [(frame, clusters) for segment, rest in zip(segments, rests, strict=True)
                      for frame, clusters in zip(segment, largest_remainder(rest, [trees_in[t] for t in segment])
                                                 if rest else [0] * len(segment), strict=True) if clusters]
    anchors, cluster_of_root = cluster_trees(tree_sums, tree_size if linked else None, is_root.view(frames, places),
                                             trees_in, frame_clusters)
    keep = torch.sort((~flat_picked).to(torch.uint8), stable=True).indices[: sum(picked_counts)].sort().values
    if not anchors:
        return Selection(keep, in_clip_order=True)
    merging = torch.sort(flat_picked.to(torch.uint8), stable=True).indices[: frames * places - sum(picked_counts)]
    group = cluster_of_root[flat_roots[merging]]
    # each tree weighs as one token in its cluster: its tokens 1 / its size; trees of no cluster weigh 0
    weight = torch.where(group >= 0, 1 / tree_size[flat_roots[merging]], 0.0)
    return Selection(keep, merging, group.clamp_min(0), torch.cat(anchors), weight, in_clip_order=True)


def cluster_trees(tree_sums: torch.Tensor, tree_size: torch.Tensor | None, is_root: torch.Tensor, trees_in: list[int],
                  frame_clusters: list[tuple[int, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each (frame, clusters) of `frame_clusters`: the trees rooted in the frame merged by density peaks
    into that many clusters, every frame in one batch (`tree_size` None: every tree is one token, its
    sum its mean). Returns the clusters' anchors (their centres' roots) and the cluster of each root
    (-1: none), numbered frame after frame."""
    frames, places = is_root.shape
    device = tree_sums.device
    cluster_of_root = torch.full((frames * places,), -1, dtype=torch.long, device=device)
    if not frame_clusters:
        return [], cluster_of_root
    chosen = to_device([frame for frame, _ in frame_clusters], device)
    counts = [trees_in[frame] for frame, _ in frame_clusters]
    # each chosen frame's roots, ascending (past its count: other tokens of the frame, as padding)
    roots_first = torch.sort((~is_root[chosen]).to(torch.uint8), dim=1, stable=True).indices[:, : max(counts)]
    tree_roots = chosen[:, None] * places + roots_first
    tree_means = tree_sums[tree_roots]
    if tree_size is not None:  # (in place: a second copy of every tree's tokens costs more on a CPU)
        tree_means.div_(tree_size[tree_roots, None].clamp_min(1).to(tree_sums.dtype))
    found = dpc_knn_groups(tree_means, counts, [clusters for _, clusters in frame_clusters],
                           [min(NEIGHBOURS, clusters) for _, clusters in frame_clusters])
    anchors, so_far = [], 0
    for group, ((_, clusters), (centres, assignment)) in enumerate(zip(frame_clusters, found, strict=True)):
        roots = tree_roots[group, : counts[group]]
        cluster_of_root[roots] = assignment + so_far
        anchors.append(roots[centres])
        so_far += clusters
    return anchors, cluster_of_root


def cut_segments(frame_means: torch.Tensor) -> list[list[int]]:
    """DySeg on the frames' mean tokens: the T - 1 adjacent cosines are read to the host once."""
    frames = frame_means.shape[0]
    similarity = F.cosine_similarity(frame_means[:-1], frame_means[1:], dim=-1).tolist()
    cuts = {t for t, value in enumerate(similarity) if value < SEGMENT_CUT}
    wanted = max(1, frames // FRAMES_PER_SEGMENT) - 1 - len(cuts)
    cuts |= set(sorted(set(range(frames - 1)) - cuts, key=lambda t: (similarity[t], t))[: max(0, wanted)])
    segments, start = [], 0
    for t in sorted(cuts) + [frames - 1]:
        segments.append(list(range(start, t + 1)))
        start = t + 1
    return segments


def cosines(a: torch.Tensor, b: torch.Tensor, inverse_a: torch.Tensor, inverse_b: torch.Tensor) -> torch.Tensor:
    """[t, i, j] cosine of a[t, i] and b[t, j], in float32 from their product in their dtype."""
    return (a @ b.transpose(1, 2)).float() * inverse_a[:, :, None] * inverse_b[:, None, :]


def adts_order(tokens: torch.Tensor, inverse_norms: torch.Tensor, saliency: torch.Tensor,
               segment_means: torch.Tensor, picks: int) -> torch.Tensor:
    """(frames, picks): each frame's first `picks` ADTS choices, in order (the greedy pick is a prefix
    of any longer one). Distance (1 - cos(i, j)) * saliency_j * relevance_j, relevance_j being token
    j's dot product with its segment's mean token (`tokens` in a dtype whose range holds it: bfloat16
    for a float16 model); first the token whose nearest other is farthest, then each time the one
    farthest from all picked."""
    frames, places, _ = tokens.shape
    relevance = (tokens @ segment_means.to(tokens.dtype)[:, :, None]).squeeze(2).float()
    scale = saliency * relevance  # (frames, places): a_j * r_j
    distance = (1 - cosines(tokens, tokens, inverse_norms, inverse_norms)) * scale[:, None, :]  # [t, i, j]
    if not picks:
        return torch.empty(frames, 0, dtype=torch.long, device=tokens.device)
    nearest_other = torch.topk(distance, k=min(2, places), dim=1, largest=False).values[:, -1]
    # from here a token's distance to itself is -inf: once picked, nothing is farther from the picks
    distance.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    rows = torch.arange(frames, device=tokens.device)
    pick = nearest_other.argmax(1)
    chosen = [pick]
    closest = distance[rows, pick]  # (frames, places): distance from the nearest pick
    for _ in range(1, picks):
        pick = closest.argmax(1)
        chosen.append(pick)
        closest = torch.minimum(closest, distance[rows, pick])
    return torch.stack(chosen, 1)


def merge_across_time(tokens: torch.Tensor, inverse_norms: torch.Tensor, is_picked: torch.Tensor, roots: torch.Tensor,
                      most: int) -> torch.Tensor:
    """A segment's trees: every token not picked, from its second frame on, links to its most similar
    unpicked token of the frame before and merges into it above 0.8 cosine (at most `most` merges, the
    most similar links first, ties by index). Returns (L, places) the clip index of each token's root."""
    length, places, _ = tokens.shape
    if length < 2 or most <= 0:
        return roots
    # [t, j, i]: frame t + 1's j against frame t's i
    similarity = cosines(tokens[1:], tokens[:-1], inverse_norms[1:], inverse_norms[:-1])
    similarity = similarity.masked_fill(is_picked[:-1, None, :], -1.0).masked_fill(is_picked[1:, :, None], -1.0)
    best, link = similarity.max(2)
    candidate = (best > TEMPORAL_CUT) & ~is_picked[1:]
    rank = torch.empty_like(link.flatten())
    rank[torch.sort(-torch.where(candidate, best, -math.inf).flatten(), stable=True).indices] = torch.arange(
        rank.numel(), device=rank.device)
    merges = candidate & (rank.view_as(link) < most)
    roots = roots.clone()
    for t in range(1, length):
        roots[t] = torch.where(merges[t - 1], roots[t - 1][link[t - 1]], roots[t])
    return roots
