"""DyCoke (Tao et al., CVPR 2025; official code KD-TAO/DyCoke): temporal token merging (TTM) before
layer 0 drops, in every other frame, the tokens that barely changed since the frame before; then, at
every decoding step, the new token's attention chooses the B visual keys the later layers see
(`dycoke`), or, as a prefill-time stand-in, the last prompt token's attention keeps exactly B
(`dycoke-prefill`).

What is implemented, adapted to VideoLLaVA and to an exact budget (../shared/PEERS.md):
- TTM, as the official `dycole_ttm`: frames are paired (0, 1), (2, 3), ...; in each pair the second
  frame keeps its k positions least cosine-similar to the same position in the first; then within
  each window of four frames (0-3, 4-7, ...; the last full window excluded, as in the code) the third
  frame keeps its k positions least similar to the first. For 8 frames, frames 0, 4 and 6 stay whole.
  Every spatial index counts, CLS included. The original keeps k = 30% of a frame; here
  k = clamp(ceil((max(B, M0) - whole x N) / pruned), 1, N), so that TTM leaves at least B tokens
  (M0 is the count with the original k). Kept tokens stay in clip order (the original leaves a pruned
  frame's tokens in similarity order).
- Dynamic KV pruning (`dycoke`), as the official `PrunableDynamicCache` and its caller: the prefill
  runs on everything TTM left, and the first answer token comes from it. At each later decoding step,
  the new token's head-averaged attention at layer l - 1 = 2 (DyCoke's l = 3), over the visual keys, is
  compared with the step before's (cosine; 0 at the first step): below 0.9, layers >= l attend to the
  B visual keys it attends to most (the original keeps int(0.3 x the TTM count); here B, the
  budget's meaning for this method: the visual tokens decoding attends to) and every other key;
  otherwise to every key, as the official code does (its view is reset at every step and only set
  when the attention changed). Keys are hidden, never dropped: a later step may choose them again
  (the original keeps the full cache too). Ties go to the earlier token (the original's `topk` is
  unordered); `--min-per-frame` holds at every step; the memory of the step before is per question
  (the original's is never reset between samples); the attention and its cosine are float32 (the
  original's eager probabilities are in the model's half precision, which can move a step across 0.9);
  the visual keys are where the prompt put them (the original hard-codes Qwen's template offset 14).
- The prefill-time stand-in (`dycoke-prefill`) lands on B in the prefill: after layer 2, keep the B
  tokens the last prompt token attends to most (FastV-like); decoding then runs on those.
- Positions (`--positions authors`, the default): renumbered after each stage on a 1-D RoPE model, as
  the original after TTM (which shortens the sequence before the LLM); kept (3-D) on Qwen2.5-VL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vidsparse.models.visual import ClipGrid
from vidsparse.pruning.attention_scored import FastV
from vidsparse.pruning.base import BEFORE_FIRST_LAYER, BeforeFirstLayer, DecodingStep, Selection, StageInput, top_k

MERGE_RATIO = 0.7  # K: the share of a pruned frame's tokens TTM drops by default
ATTENTION_LAYER = 2  # the second stage prunes after this layer (DyCoke's l = 3 reads layer l - 1)
STILL_ATTENTION = 0.9  # a step whose attention is this similar to the step before's prunes nothing


def ttm_pairs(num_frames: int) -> list[tuple[int, int]]:
    """(reference frame, pruned frame) in the order the official code prunes them."""
    pairs = [(i, i + 1) for i in range(0, num_frames - 1, 2)]
    return pairs + [(i, i + 2) for i in range(0, num_frames - 4, 4)]


def pruned_frames(num_frames: int) -> set[int]:
    """The frames TTM prunes (the others stay whole)."""
    return {frame for _, frame in ttm_pairs(num_frames)}


def ttm_keep_count(budget: int, num_frames: int, per_frame: int) -> int:
    """Tokens each pruned frame keeps: enough that TTM leaves >= B tokens (and the default K's count
    where that is more), at least 1, at most the whole frame."""
    pruned = len(pruned_frames(num_frames))
    if not pruned:
        return per_frame
    whole = (num_frames - pruned) * per_frame
    default = whole + pruned * int((1 - MERGE_RATIO) * per_frame)
    return min(per_frame, max(1, math.ceil((max(budget, default) - whole) / pruned)))


def attention_layer(num_layers: int) -> int:
    return min(ATTENTION_LAYER, num_layers - 2)


class DyCoke(BeforeFirstLayer):
    """TTM in the prefill, and the decode-time choice of keys."""

    summary = ("DyCoke: temporal merging drops the tokens of every other frame that match the frame before "
               "(before layer 0); at each decoding step whose attention changed, the new token sees the B visual "
               "tokens it attends to most after layer 2")

    def decoding_layer(self, num_layers: int) -> int:
        return attention_layer(num_layers)

    def select(self, stage: StageInput) -> Selection:
        return Selection(temporal_merge(stage.hidden, stage.grid, stage.budget))

    def select_while_decoding(self, step: DecodingStep) -> tuple[torch.Tensor, torch.Tensor]:
        attention = step.attention
        top = torch.stack([top_k(row, step.budget, step.frames, step.min_per_frame) for row in attention])
        seen = torch.zeros_like(attention, dtype=torch.bool).scatter_(1, top, True)
        if step.previous is not None:
            similar = F.cosine_similarity(attention, step.previous, dim=-1) >= STILL_ATTENTION
            seen |= similar[:, None]
        return seen, attention


class DyCokePrefill(FastV):
    """Its second stage is FastV's at DyCoke's layer, in the prefill."""

    summary = ("DyCoke with a prefill-time stand-in for its decode-time pruning: temporal merging (before layer 0), "
               "then the last prompt token's attention keeps B (after layer 2)")
    allows_prune_after = False

    def default_stages(self, num_layers: int) -> list[int]:
        return [BEFORE_FIRST_LAYER, attention_layer(num_layers)]

    def select(self, stage: StageInput) -> Selection:
        if stage.layer == BEFORE_FIRST_LAYER:
            return Selection(temporal_merge(stage.hidden, stage.grid, stage.budget))
        return super().select(stage)


def temporal_merge(x: torch.Tensor, grid: ClipGrid, budget: int) -> torch.Tensor:
    """Ascending indices of the tokens TTM keeps (every frame has the same number of tokens here)."""
    num_frames, per_frame = grid.frames, grid.per_frame
    tokens = x.float().view(num_frames, per_frame, -1)
    keep = ttm_keep_count(budget, num_frames, per_frame)
    pruned = len(pruned_frames(num_frames))
    dropped = torch.zeros(num_frames, per_frame, dtype=torch.uint8, device=x.device)
    for reference, frame in ttm_pairs(num_frames):
        similarity = F.cosine_similarity(tokens[reference], tokens[frame], dim=-1)
        dropped[frame] = 1
        dropped[frame, torch.sort(similarity, stable=True).indices[:keep]] = 0
    kept = (num_frames - pruned) * per_frame + pruned * keep  # known here: no nonzero
    return torch.sort(dropped.flatten(), stable=True).indices[:kept]  # stable: ascending
