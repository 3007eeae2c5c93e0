"""Prefill through the decoder layers with pruning stages, then greedy decoding on the per-layer
KV cache.

An explicit loop over `decoder.layers` (no `generate()`): a stage "after layer p" runs layers up to
p, lets the method choose from layer p's attention, removes/merges visual rows of layer p's output,
and the following layers see (and cache) only what is left. Layers keep caches of different
lengths. Batch size 1; attention is SDPA with its built-in causal mask (no n x n mask is built).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from vidsparse.models.video_llava import PromptEmbeds
from vidsparse.pruning.base import BEFORE_FIRST_LAYER, PromptText, PruningPlan, Selection, StageInput
from vidsparse.pruning.stage import VisualBlock, apply_selection, attention_rows
from vidsparse.stats import StageTimer


@dataclass(frozen=True)
class StageRecord:
    layer: int
    visual_out: int
    selection: Selection


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS excluded
    cache: DynamicCache
    tokens_per_layer: list[int]  # prompt tokens entering each decoder layer in prefill
    visual_per_layer: list[int]  # visual tokens entering each decoder layer in prefill
    first_logits: torch.Tensor  # (vocab,) logits after the prompt
    stages: list[StageRecord] = field(default_factory=list)
    block: VisualBlock | None = None  # the visual tokens left after the last stage
    # RoPE position of the next token, per layer: the positions a full recomputation would give it
    # (keep: after the original prompt; compact: after the layer's own, shortened, sequence).
    next_positions: list[int] = field(default_factory=list)


def _check_attention(decoder) -> None:
    impl = decoder.config._attn_implementation
    if impl not in ("sdpa", "flash_attention_2"):
        raise ValueError(f"the engine relies on SDPA's implicit causal mask; the model uses {impl!r}")


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


def prefill(decoder, prompt: PromptEmbeds, plan: PruningPlan | None, timer: StageTimer,
            replay: list[Selection] | None = None) -> tuple[torch.Tensor, Generation]:
    """Run the prompt through every layer, pruning at the plan's stages. `replay` re-applies the
    selections of an earlier run instead of asking the method (the no-cache reference uses it).
    Returns the last layer's hidden states and the Generation holding cache and bookkeeping."""
    _check_attention(decoder)
    hidden = prompt.embeds
    n = hidden.shape[1]
    num_layers = len(decoder.layers)
    visual = prompt.visual
    device = hidden.device
    block = VisualBlock(int(visual.positions[0]) if len(visual) else n, torch.arange(len(visual), device=device),
                        torch.zeros(len(visual), dtype=torch.bool, device=device))
    frames, patch_rows, patch_cols = (t.to(device) for t in (visual.frame, visual.row, visual.col))
    positions = torch.arange(n, device=device)[None]
    cache = DynamicCache(config=decoder.config)
    stages = plan.stages if plan and plan.budget < len(visual) else []  # B >= n: the contract says no pruning
    generation = Generation([], cache, [], [], torch.empty(0), [], block)
    method = plan.method if plan else None
    if method is not None and replay is None:
        with timer.stage("pruning"):
            method.prepare(PromptText(hidden[0], block.start, block.size, prompt.suffix_words))
    generator = torch.Generator().manual_seed(plan.seed) if plan else None
    layer = 0
    for index, stage_layer in enumerate(stages):
        cos_sin = decoder.rotary_emb(hidden, positions)
        layer_input = hidden
        if stage_layer > BEFORE_FIRST_LAYER:
            layer_input = _layers(decoder, hidden, positions, cos_sin, cache, range(layer, stage_layer), generation)
            hidden = _layers(decoder, layer_input, positions, cos_sin, cache, range(stage_layer, stage_layer + 1),
                             generation)
        with timer.stage("pruning"):
            if replay is not None:
                selection = replay[index]
            else:
                attention = None
                if method.needs_attention and stage_layer > BEFORE_FIRST_LAYER:  # no layer has run before 0
                    query = block.end + method.query_rows(hidden.shape[1] - block.end).to(device)
                    attention = attention_rows(decoder.layers[stage_layer], layer_input, query, cos_sin,
                                               cache.layers[stage_layer].keys)[:, block.start : block.end]
                selection = method.select(StageInput(
                    index=index, num_stages=len(stages), layer=stage_layer, num_visual=len(visual),
                    budget=min(plan.budget, len(visual)), hidden=hidden[0, block.start : block.end],
                    frames=frames[block.origin], rows=patch_rows[block.origin], cols=patch_cols[block.origin],
                    attention=attention, min_per_frame=plan.min_per_frame, generator=generator,
                    saliency=None if prompt.saliency is None else prompt.saliency.to(device)[block.origin],
                    frame_features=prompt.frame_features,
                ))
            hidden, positions, block = apply_selection(hidden, positions, block, selection, plan.positions)
        generation.stages.append(StageRecord(stage_layer, block.size, selection))
        generation.block = block
        layer = stage_layer + 1
    cos_sin = decoder.rotary_emb(hidden, positions)
    hidden = _layers(decoder, hidden, positions, cos_sin, cache, range(layer, num_layers), generation)
    keep_positions = plan is None or plan.positions == "keep"
    generation.next_positions = [n] * num_layers if keep_positions else list(generation.tokens_per_layer)
    return hidden, generation


def _layers(decoder, hidden, positions, cos_sin, cache, layers: range, generation: Generation) -> torch.Tensor:
    """run_layers, recording how many tokens (and visual tokens) enter each layer."""
    visual = generation.block.size if generation.block else 0
    for _ in layers:
        generation.tokens_per_layer.append(hidden.shape[1])
        generation.visual_per_layer.append(visual)
    return run_layers(decoder, hidden, positions, cos_sin, cache, layers)


@torch.inference_mode()
def generate(decoder, lm_head: torch.nn.Linear, prompt: PromptEmbeds, max_new_tokens: int,
             eos_token_ids: set[int], timer: StageTimer, plan: PruningPlan | None = None) -> Generation:
    """Greedy decoding: prefill the prompt (pruning as planned), then one token at a time."""
    with timer.stage("prefill"):
        hidden, generation = prefill(decoder, prompt, plan, timer)
        logits = lm_head(decoder.norm(hidden[:, -1:]))[0, -1].float()
    generation.first_logits = logits
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos_token_ids:
            break
        generation.token_ids.append(token)
        if step + 1 == max_new_tokens:
            break
        with timer.stage("generate"):
            hidden = decoder.embed_tokens(torch.tensor([[token]], device=prompt.embeds.device))
            hidden = decode_step(decoder, hidden, [p + step for p in generation.next_positions], generation.cache)
            logits = lm_head(decoder.norm(hidden))[0, -1].float()
    return generation


def decode_step(decoder, hidden: torch.Tensor, positions: list[int], cache: DynamicCache) -> torch.Tensor:
    """One new token through every layer, at each layer's own RoPE position (RoPE tables are
    computed once per run of layers sharing a position)."""
    start = 0
    for end in range(1, len(positions) + 1):
        if end == len(positions) or positions[end] != positions[start]:
            position_ids = torch.tensor([[positions[start]]], device=hidden.device)
            cos_sin = decoder.rotary_emb(hidden, position_ids)
            hidden = run_layers(decoder, hidden, position_ids, cos_sin, cache, range(start, end))
            start = end
    return hidden
