"""Prefill through the decoder layers, then greedy decoding on the per-layer KV cache.

An explicit loop over `decoder.layers` (no `generate()`), so that pruning stages can act between
layers and each layer's cache can hold its own number of tokens. Batch size 1; attention is SDPA
with its built-in causal mask (no n x n mask is ever built).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vidsparse.stats import StageTimer


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS excluded
    cache: DynamicCache
    tokens_per_layer: list[int]  # prompt tokens entering each decoder layer in prefill
    first_logits: torch.Tensor  # (vocab,) logits after the prompt


def _check_attention(decoder) -> None:
    impl = decoder.config._attn_implementation
    if impl not in ("sdpa", "flash_attention_2"):
        raise ValueError(f"the engine relies on SDPA's implicit causal mask; the model uses {impl!r}")


def run_layers(decoder, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
               layers: range) -> torch.Tensor:
    """Run decoder layers `layers` on `hidden` (1, n, d), appending their keys/values to `cache`."""
    position_embeddings = decoder.rotary_emb(hidden, position_ids)
    for i in layers:
        hidden = decoder.layers[i](
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            cache=cache,
            use_cache=True,
        )
    return hidden


@torch.inference_mode()
def generate(decoder, lm_head: torch.nn.Linear, embeds: torch.Tensor, max_new_tokens: int,
             eos_token_ids: set[int], timer: StageTimer) -> Generation:
    """Greedy decoding: prefill the prompt embeddings (1, n, d), then one token at a time."""
    _check_attention(decoder)
    n = embeds.shape[1]
    num_layers = len(decoder.layers)
    cache = DynamicCache(config=decoder.config)
    with timer.stage("prefill"):
        positions = torch.arange(n, device=embeds.device)[None]
        hidden = run_layers(decoder, embeds, positions, cache, range(num_layers))
        logits = lm_head(decoder.norm(hidden[:, -1:]))[0, -1].float()
    generation = Generation([], cache, [n] * num_layers, logits)
    next_position = n
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos_token_ids:
            break
        generation.token_ids.append(token)
        if step + 1 == max_new_tokens:
            break
        with timer.stage("generate"):
            hidden = decoder.embed_tokens(torch.tensor([[token]], device=embeds.device))
            positions = torch.tensor([[next_position]], device=embeds.device)
            hidden = run_layers(decoder, hidden, positions, cache, range(num_layers))
            logits = lm_head(decoder.norm(hidden))[0, -1].float()
        next_position += 1
    return generation
