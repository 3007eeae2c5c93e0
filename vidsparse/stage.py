"""Stage mechanics shared by every method (SPEC section 3): attention rows without the n x n
matrix, and removal/merging of visual rows with their positions and provenance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vidsparse.layers import grouped_scores
from vidsparse.pruning.base import PositionMode, Selection


@dataclass(frozen=True)
class VisualBlock:
    """Where the visual tokens are in the current sequence, and which clip token each one is."""

    start: int  # sequence index of the first visual token (the prefix text comes before)
    origin: torch.Tensor  # (n_v,) index into the prompt's VisualMap (a merged token: its anchor's)
    merged: torch.Tensor  # (n_v,) bool: a mix of clip tokens (merged / recycled with others), not one of them
    clip_places: torch.Tensor  # (3, n_clip) frame, row, col of every clip token, on the device (copied once)

    def places(self) -> torch.Tensor:
        """(3, n_v) frame, row, col of each current token (a merged token: its anchor's)."""
        return self.clip_places[:, self.origin]

    @property
    def size(self) -> int:
        return int(self.origin.numel())

    @property
    def end(self) -> int:
        return self.start + self.size


def row_queries(layer, query_input: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Decoder `layer`'s queries (1, H, r, hd) of r rows from their layer input `query_input` (1, r, d):
    input_layernorm, q_proj, RoPE with `cos_sin` at their positions; for rows whose layer ran without
    keeping its queries (HF's layer module)."""
    attn = layer.self_attn
    rows = query_input.shape[1]
    query = attn.q_proj(layer.input_layernorm(query_input)).view(1, rows, -1, attn.head_dim).transpose(1, 2)
    query, _ = apply_rotary_pos_emb(query, query, *cos_sin)
    return query


def attention_rows(layer, queries: torch.Tensor, query_index: torch.Tensor, key_blocks: Sequence[torch.Tensor],
                   ) -> torch.Tensor:
    """Head-averaged attention probabilities (r, n) of r query rows at decoder `layer`, from their
    post-RoPE `queries` (1, H, r, hd) and the layer's cached post-RoPE keys, given as consecutive
    blocks (a clip's shared head, then a question's own) so that none is copied. `query_index` (r,):
    each row's index in the sequence, for the causal mask. Softmax in fp32. Cost O(r x n): SDPA stays
    on for the layer itself."""
    scores = torch.cat([grouped_scores(queries, keys, layer.self_attn.scaling) for keys in key_blocks], -1)
    n = scores.shape[-1]
    future = torch.arange(n, device=scores.device)[None, :] > query_index[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1).mean(dim=(0, 1, 2))


GROUPS_AT_ONCE = 256  # merged tokens made per product: the weights held are this many rows of the block


def merged_tokens(selection: Selection, visual: torch.Tensor) -> torch.Tensor:
    """The weighted group means of `selection` over the block `visual` (1, n, d): per chunk of groups,
    a weight matrix (groups x n, float32) times the block in its dtype, divided by the totals of the
    weights as that dtype holds them. One product instead of a float32 copy of every source row;
    totals of the rounded weights, because normalised weights rounded to bfloat16 would scale whole
    tokens (1/3 becomes 0.33398: every mean of three 0.2% too long); chunks, so that the weights held
    grow with the block, not with groups x block. Entries of other chunks add a zero weight."""
    source, target = selection.merge_source, selection.merge_target
    weight = (torch.ones(source.numel(), device=visual.device) if selection.merge_weight is None
              else selection.merge_weight.to(torch.float32))
    count = selection.merge_anchor.numel()
    parts = []
    for first in range(0, count, GROUPS_AT_ONCE):
        rows = min(GROUPS_AT_ONCE, count - first)
        local = target - first
        inside = (local >= 0) & (local < rows)
        matrix = torch.zeros(rows, visual.shape[1], device=visual.device).index_put_(
            (local.clamp(0, rows - 1), source), weight * inside, accumulate=True).to(visual.dtype)
        parts.append((matrix @ visual).float() / matrix.float().sum(1, keepdim=True))
    return torch.cat(parts, 1).to(visual.dtype)


def mixes(selection: Selection) -> torch.Tensor:
    """Which of the selection's groups mix other tokens into their anchor; a group that is its anchor
    alone (a centre nothing joined, or joined with weight 0 only) is that token."""
    anchor = selection.merge_anchor
    others = (selection.merge_source != anchor[selection.merge_target]).float()
    if selection.merge_weight is not None:  # a source of weight 0 adds nothing
        others = others * (selection.merge_weight > 0)
    return torch.zeros(anchor.numel(), device=anchor.device).index_add_(0, selection.merge_target, others) > 0


def apply_selection(hidden: torch.Tensor, positions: torch.Tensor, block: VisualBlock, selection: Selection,
                    mode: PositionMode) -> tuple[torch.Tensor, torch.Tensor, VisualBlock]:
    """Remove/merge visual rows of `hidden` (1, n, d): the new visual block is the kept rows then the
    merged ones (or, with `in_clip_order`, all of them in clip order, a merged row at its anchor's
    place). Positions (P, 1, n) follow (`keep`: original RoPE positions, a merged token its anchor's;
    `compact`: renumbered 0..n'-1, 1-D only). The new sequence is one gather of the rows that stay (a
    merged row's slot takes its anchor's row, then its mix is written over it): on a CPU each copy of
    the sequence costs a pass over memory."""
    device = hidden.device
    keep = selection.keep
    places = [keep]  # index in the current block of each output row (a merged row: its anchor's)
    merged = [block.merged[keep]]
    anchor = selection.merge_anchor
    if anchor.numel():
        places.append(anchor)
        merged.append(mixes(selection) | block.merged[anchor])  # an anchor merged at an earlier stage stays a mix
    place = torch.cat(places)
    order = torch.sort(place, stable=True).indices if selection.in_clip_order else None
    placed = place if order is None else place[order]
    rows = torch.cat([torch.arange(block.start, device=device), block.start + placed,
                      torch.arange(block.end, hidden.shape[1], device=device)])
    new_hidden = hidden.index_select(1, rows)
    if anchor.numel():
        slots = torch.arange(keep.numel(), place.numel(), device=device)  # the merged rows' places in `place`
        if order is not None:  # ... and in the new block
            slots = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=device))[slots]
        new_hidden.index_copy_(1, block.start + slots, merged_tokens(selection, hidden[:, block.start : block.end]))
    positions = (torch.arange(new_hidden.shape[1], device=device)[None, None] if mode == "compact"
                 else positions.index_select(-1, rows))
    flags = torch.cat(merged) if order is None else torch.cat(merged)[order]
    return new_hidden, positions, VisualBlock(block.start, block.origin[placed], flags, block.clip_places)
