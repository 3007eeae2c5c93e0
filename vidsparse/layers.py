"""Running decoder layers, two ways.

- `run_layers`: the model's own layers (SDPA with its implicit causal mask) on a whole sequence,
  appending to a `DynamicCache`. Used for the head of a prompt and wherever a question's own
  sequence goes through layers with nothing shared.
- `run_after_head` / `layer_step_together`: rows that come after a *shared head* (the prompt up to the
  end of the visual block, computed once per clip) -- several questions' rows at once, or one new
  token of each of several questions, about one clip or several (each clip's rows a `RowGroup`):
  they attend to their clip's head keys/values, read in place, and to their own. Attention is
  written out (scores per block, one softmax over both) because SDPA takes one key tensor, and
  joining the head's keys to each question's would copy the clip's whole KV cache per question. It
  is only used for few rows (questions, decoded tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vidsparse.transfer import to_device


@dataclass(frozen=True)
class HeadKV:
    """One layer's keys and values of the shared head, (1, kv_heads, n_head, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor


def rotary(decoder, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin (b, n, head_dim) of rows at `positions` (P, b, n): P = 1 for 1-D RoPE; for M-RoPE
    (time, height, width) the decoder's rotary embedding combines the P sections itself. Text rows may
    be given with P = 1 in any family (their position is the same in every section)."""
    return decoder.rotary_emb(hidden, positions[0] if positions.shape[0] == 1 else positions)


def run_layers(decoder, hidden: torch.Tensor, positions: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
               cache: DynamicCache, layers: range) -> torch.Tensor:
    """Run decoder layers `layers` on `hidden` (1, n, d) at RoPE `positions` (P, 1, n), appending their
    keys/values to `cache`."""
    for i in layers:
        hidden = decoder.layers[i](
            hidden,
            attention_mask=None,
            position_ids=positions[0],
            position_embeddings=cos_sin,
            cache=cache,
            use_cache=True,
        )
    return hidden


def grouped_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(b, H, r, hd) queries x keys -> fp32 scores (b, kv_heads, H / kv_heads, r, n). Keys are
    (b, kv_heads, n, hd), or (kv_heads, n, hd) shared by every query row: the queries are folded
    onto them, the keys are never expanded or copied. GQA: query heads are grouped by the key head
    they share; the product runs in the keys' dtype (no fp32 copy of every key)."""
    kv_heads = keys.shape[-3]
    grouped = query.reshape(query.shape[0], kv_heads, -1, query.shape[-2], query.shape[-1]).to(keys.dtype)
    pattern = "bkgrd,knd->bkgrn" if keys.dim() == 3 else "bkgrd,bknd->bkgrn"
    return torch.einsum(pattern, grouped, keys).float() * scaling


def _project(layer, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]):
    """The layer's queries, keys and values of rows `hidden` (b, r, d), RoPE applied: (b, heads, r, hd)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*hidden.shape[:2], -1, attn.head_dim)
    query = attn.q_proj(x).view(shape).transpose(1, 2)
    key = attn.k_proj(x).view(shape).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *cos_sin)
    return query, key, value


@dataclass(frozen=True)
class VisualKeys:
    """The visual block among a layer's keys while decoding with a method that chooses keys per step:
    columns start .. start + count of the layer's keys (the shared head's, then the rows' own) and,
    where given, which of them each row may not see ((b, count) bool)."""

    start: int
    count: int
    hidden: torch.Tensor | None = None


def _attend(attn, query: torch.Tensor, head: HeadKV | None, keys: torch.Tensor, values: torch.Tensor,
            hidden_keys: torch.Tensor, visual: VisualKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` (b, H, r, hd) over the head's keys (shared by every row) and `keys`/`values`
    (b, kv_heads, n, hd), where `hidden_keys` (b, r, n) marks keys a row must not see (and
    `visual.hidden` visual keys); one fp32 softmax over both blocks. Returns the heads' outputs
    (b, r, H * hd) and the probabilities (b, kv_heads, H / kv_heads, r, keys)."""
    batch, rows = query.shape[0], query.shape[-2]
    scores = grouped_scores(query, keys, attn.scaling).masked_fill(hidden_keys[:, None, None], float("-inf"))
    if head is not None:
        scores = torch.cat([grouped_scores(query, head.keys[0], attn.scaling), scores], -1)
    if visual is not None and visual.hidden is not None:
        seen = scores[..., visual.start : visual.start + visual.count]
        seen.masked_fill_(visual.hidden[:, None, None, None], float("-inf"))
    probs = scores.softmax(-1)
    if head is None:
        out = torch.einsum("bkgrn,bknd->bkgrd", probs.to(values.dtype), values)
    else:
        n_head = head.keys.shape[-2]
        out = (torch.einsum("bkgrn,knd->bkgrd", probs[..., :n_head].to(head.values.dtype), head.values[0])
               + torch.einsum("bkgrn,bknd->bkgrd", probs[..., n_head:].to(values.dtype), values))
    return out.reshape(batch, -1, rows, attn.head_dim).transpose(1, 2).reshape(batch, rows, -1), probs


def _finish(layer, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of the layer after attention: o_proj, residual, MLP."""
    hidden = hidden + layer.self_attn.o_proj(attended.to(hidden.dtype))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def run_after_head(decoder, heads: list[tuple[slice, list[HeadKV]]], hidden: torch.Tensor, starts: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Rows of b questions (hidden (b, r, d), right-padded to a common r) after shared heads, through
    the layers the heads cover (the same number for every head): the questions at `heads[k][0]` (a
    range of the batch) attend to head k's keys/values at each layer; at layer i question q's rows sit
    at RoPE positions starts[q, i], starts[q, i] + 1, ... Row j of a question sees every key of its
    head and that question's rows up to j (padding comes after its rows, so no real row sees it). The
    projections and the MLP run on every row at once (the weights read once, whatever the clips).
    Returns the last layer's output, the last layer's queries of the rows (b, H, r, hd, after RoPE: a
    question-guided stage there reads them), and each layer's keys/values of the rows, (b, kv_heads, r, hd)."""
    local = torch.arange(hidden.shape[1], device=hidden.device)
    future = (local[None, :] > local[:, None])[None]
    query, kv = None, []
    for i in range(starts.shape[1]):
        layer = decoder.layers[i]
        query, key, value = _project(layer, hidden, rotary(decoder, hidden, (starts[:, i, None] + local)[None]))
        kv.append((key, value))
        attended = [_attend(layer.self_attn, query[rows], head[i], key[rows], value[rows], future)[0]
                    for rows, head in heads]
        hidden = _finish(layer, hidden, attended[0] if len(attended) == 1 else torch.cat(attended))
    return hidden, query, kv


@dataclass
class PaddedKV:
    """Several questions' own keys/values at one layer, for decoding them together: (b, kv_heads,
    capacity, hd) buffers filled to `lengths`, written in place as tokens are decoded."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor  # (b,) long

    @classmethod
    def gather(cls, layers: list, room: list[int]) -> PaddedKV:
        """From each question's cache layer (DynamicLayer), with room for `room[i]` more tokens of question i."""
        counts = [layer.keys.shape[-2] for layer in layers]
        capacity = max(count + extra for count, extra in zip(counts, room, strict=True))
        keys = layers[0].keys.new_zeros(len(layers), layers[0].keys.shape[1], capacity, layers[0].keys.shape[-1])
        values = torch.zeros_like(keys)
        for i, layer in enumerate(layers):
            keys[i, :, : layer.keys.shape[-2]] = layer.keys[0]
            values[i, :, : layer.values.shape[-2]] = layer.values[0]
        return cls(keys, values, to_device(counts, keys.device))

    def joined(self, other: PaddedKV) -> PaddedKV:
        """These rows, then `other`'s (questions joining a running decoding), in buffers as long as the
        longer's: each row keeps the room it was given."""
        capacity = max(self.keys.shape[-2], other.keys.shape[-2])

        def rows(*buffers: torch.Tensor) -> torch.Tensor:
            return torch.cat([F.pad(t, (0, 0, 0, capacity - t.shape[-2])) for t in buffers])

        return PaddedKV(rows(self.keys, other.keys), rows(self.values, other.values),
                        torch.cat([self.lengths, other.lengths]))


@dataclass(frozen=True)
class RowGroup:
    """Consecutive rows of a decoding batch that attend to one shared head (one clip's questions):
    `rows`, the `head`'s keys/values at the layer (None: past the shared layers), the `visual` keys
    they may see and whether to `report` their attention over them."""

    rows: slice
    head: HeadKV | None
    visual: VisualKeys | None = None
    report: bool = False


def layer_step_together(layer, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], own: PaddedKV,
                        groups: list[RowGroup]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One new token of each of b questions (hidden (b, 1, d), each at its own position) through a
    decoder layer: written into `own` at each question's length, attending to its group's shared head
    and to its own keys only (the padding beyond its length is hidden), and to the visual keys its
    group is not told to hide. The projections and the MLP run on every row at once (the weights read
    once a step, whatever the clips); only attention runs per group, over that group's head, read in
    place. Returns the layer's output and, per group asked to `report`, each token's head-averaged
    attention over its visual keys (b_group, count)."""
    query, key, value = _project(layer, hidden, cos_sin)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    own.keys[rows, :, own.lengths] = key[:, :, 0]
    own.values[rows, :, own.lengths] = value[:, :, 0]
    own.lengths += 1
    padding = torch.arange(own.keys.shape[-2], device=hidden.device)[None, :] >= own.lengths[:, None]
    attended, reports = [], []
    for group in groups:
        out, probs = _attend(layer.self_attn, query[group.rows], group.head, own.keys[group.rows],
                             own.values[group.rows], padding[group.rows, None], group.visual)
        attended.append(out)
        visual = group.visual
        reports.append(probs[..., 0, visual.start : visual.start + visual.count].mean(dim=(1, 2)) if group.report
                       else None)
    return _finish(layer, hidden, attended[0] if len(attended) == 1 else torch.cat(attended)), reports
