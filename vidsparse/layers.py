"""Running decoder layers, two ways.

- `run_layers`: the model's own layers (SDPA with its implicit causal mask) on a whole sequence,
  appending to a `DynamicCache`. Used for the head of a prompt and wherever a question's own
  sequence goes through layers with nothing shared.
- `layer_after_head`: one layer for rows that come after a *shared head* (the prompt up to the end of
  the visual block, computed once per clip): the rows attend to the head's keys/values, read in place,
  and to their own cached ones. Attention is written out (scores per block, one softmax over both)
  because SDPA takes one key tensor, and joining the head's keys to each question's would copy the
  clip's whole KV cache per question. It is only used for few rows (a question, a decoded token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass(frozen=True)
class HeadKV:
    """One layer's keys and values of the shared head, (1, kv_heads, n_head, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor


def run_layers(decoder, hidden: torch.Tensor, position_ids: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
               cache: DynamicCache, layers: range) -> torch.Tensor:
    """Run decoder layers `layers` on `hidden` (1, n, d), appending their keys/values to `cache`."""
    for i in layers:
        hidden = decoder.layers[i](
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=cos_sin,
            cache=cache,
            use_cache=True,
        )
    return hidden


def grouped_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(1, H, r, hd) queries x (1, kv_heads, n, hd) keys -> fp32 scores (1, kv_heads, H / kv_heads, r, n).
    GQA: query heads are grouped by the key head they share instead of repeating the keys; the
    product runs in the keys' dtype (no fp32 copy of every key)."""
    kv_heads = keys.shape[1]
    grouped = query.reshape(query.shape[0], kv_heads, -1, query.shape[-2], query.shape[-1])
    return torch.einsum("bkgrd,bknd->bkgrn", grouped.to(keys.dtype), keys).float() * scaling


def layer_after_head(layer, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], head: HeadKV | None,
                     cache: DynamicCache, index: int) -> torch.Tensor:
    """Decoder layer `index` on rows `hidden` (1, r, d) that follow `head` (None: nothing shared) and
    the rows already in `cache` at this layer: their keys/values are appended to `cache`. Row i sees
    every head key, the cached keys, and its own rows up to itself. The same arithmetic as
    LlamaDecoderLayer; softmax in fp32."""
    attn = layer.self_attn
    rows = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    shape = (1, rows, -1, attn.head_dim)
    query = attn.q_proj(x).view(shape).transpose(1, 2)
    key = attn.k_proj(x).view(shape).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *cos_sin)
    own_keys, own_values = cache.update(key, value, index)
    own = grouped_scores(query, own_keys, attn.scaling)
    seen = own_keys.shape[-2] - rows  # cached rows before these
    future = torch.arange(own_keys.shape[-2], device=hidden.device)[None, :] > seen + torch.arange(
        rows, device=hidden.device)[:, None]
    own = own.masked_fill(future, float("-inf"))
    if head is None:
        probs = own.softmax(-1)
        out = torch.einsum("bkgrn,bknd->bkgrd", probs.to(own_values.dtype), own_values)
    else:
        shared = grouped_scores(query, head.keys, attn.scaling)
        probs = torch.cat([shared, own], -1).softmax(-1)
        n_head = head.keys.shape[-2]
        out = (torch.einsum("bkgrn,bknd->bkgrd", probs[..., :n_head].to(head.values.dtype), head.values)
               + torch.einsum("bkgrn,bknd->bkgrd", probs[..., n_head:].to(own_values.dtype), own_values))
    out = out.reshape(1, -1, rows, attn.head_dim).transpose(1, 2).reshape(1, rows, -1)
    hidden = hidden + attn.o_proj(out.to(hidden.dtype))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
