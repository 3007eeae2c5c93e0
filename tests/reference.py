"""Slow, independent references for the pruning engine.

`masked_logits` never removes a row: every token of the prompt (and a slot for every merged token)
stays in the sequence, removed visual tokens are masked out *as keys* for the layers after their
stage with an explicit 4-D mask, attention is transformers' eager implementation, and nothing is
cached: each call recomputes everything. A method that chooses keys while decoding chooses, for
each generated token's row, from that row's eager attention, and the row alone is masked. It shares
no code with vidsparse's engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# A decoding-time choice: (layer, chooser); the chooser takes a generated token's head-averaged
# attention over the visual tokens at that layer and the previous token's (None for the first),
# and returns the visual tokens the row sees in the layers after it (bool).
DecodingChoice = tuple[int, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]]


def _mask(alive: torch.Tensor) -> torch.Tensor:
    """(1, 1, N, N) additive mask: causal by row order, dead rows hidden as keys (each row still
    sees itself, so dead rows stay finite)."""
    n = alive.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal & (alive[None, :] | torch.eye(n, dtype=torch.bool))
    return torch.where(allowed, 0.0, float("-inf"))[None, None]


def masked_logits(eager_model, prompt_embeds: torch.Tensor, visual_start: int, num_visual: int, stages,
                  positions: str, extra_tokens: list[int], rope_positions: torch.Tensor | None = None,
                  attention_at: dict | None = None, decoding: DecodingChoice | None = None) -> torch.Tensor:
    """Logits after `extra_tokens` (greedy-generated so far) follow the prompt, with the recorded
    stage selections (layer, Selection) applied by masking. `eager_model` uses eager attention.
    `rope_positions` (P, n_prompt): the prompt's positions as the family's HF code gives them (None:
    0..n-1); generated tokens continue after the largest, as HF's rope_deltas make them.
    `attention_at`, if given, receives for each stage's layer the eager attention probabilities there
    (rows, keys: head-averaged, over this reference's rows), the rows of the visual tokens the stage
    chooses from (in their block order) and the row of the first prompt row after the visual block.
    `decoding`: each generated token's row sees, after that layer, only the visual tokens chosen for it
    (the prompt's rows see every one the stages left)."""
    lm = eager_model.model.language_model
    prompt = prompt_embeds[0]
    n_prompt = prompt.shape[0]
    slots = [s.merge_anchor.numel() for _, s in stages]
    visual_end = visual_start + num_visual
    extra = lm.embed_tokens(torch.tensor(extra_tokens, dtype=torch.long)) if extra_tokens else prompt[:0]
    rows = torch.cat([prompt[:visual_end], prompt.new_zeros(sum(slots), prompt.shape[1]), prompt[visual_end:], extra])
    total = rows.shape[0]
    slot_start = visual_end
    suffix_start = visual_end + sum(slots)
    # Original RoPE position of each row, (P, rows) (a slot gets its anchor's when it comes alive).
    given = torch.arange(n_prompt)[None] if rope_positions is None else rope_positions.cpu()
    after = int(given.max()) + 1 + torch.arange(len(extra_tokens))
    original = torch.cat([given[:, :visual_end], given.new_zeros(given.shape[0], sum(slots)), given[:, visual_end:],
                          after.expand(given.shape[0], -1)], 1)
    alive = torch.ones(total, dtype=torch.bool)
    alive[slot_start:suffix_start] = False
    current = torch.arange(visual_start, visual_end)  # rows of the current visual tokens, in order
    hidden = rows[None]
    schedule = dict(stages)
    unseen = torch.zeros(total, total, dtype=torch.bool)  # per row: keys hidden by a decoding-time choice
    layer_ids = [-1] if -1 in schedule else []
    for i in [*layer_ids, *range(len(lm.layers))]:
        if i >= 0:
            row_positions = original if positions == "keep" else (torch.cumsum(alive.long(), 0) - 1)[None]
            cos_sin = lm.rotary_emb(hidden, row_positions[:, None] if row_positions.shape[0] > 1 else row_positions)
            seen: list[torch.Tensor] = []
            hook = lm.layers[i].self_attn.register_forward_hook(
                lambda module, args, out, kept=seen: kept.append(out[1]))
            mask = _mask(alive).masked_fill(unseen, float("-inf"))
            try:
                hidden = lm.layers[i](hidden, attention_mask=mask, position_ids=row_positions[:1],
                                      position_embeddings=cos_sin)
            finally:
                hook.remove()
            if decoding is not None and i == decoding[0]:
                probs, previous = seen[0][0].float().mean(0), None
                for row in range(total - len(extra_tokens), total):
                    attention = probs[row, current]
                    unseen[row, current[~decoding[1](attention, previous)]] = True
                    previous = attention
            if attention_at is not None and i in schedule:
                attention_at[i] = (seen[0][0].float().mean(0), current.clone(), visual_end + sum(slots))
        if i in schedule:
            selection = schedule[i]
            count = selection.merge_anchor.numel()
            # A merged token takes a fresh slot after the visual block, or with `in_clip_order` its
            # anchor's own row (which earlier layers saw as the anchor itself).
            new_slots = (current[selection.merge_anchor] if selection.in_clip_order
                         else torch.arange(slot_start, slot_start + count))
            weights = (torch.ones(selection.merge_source.numel()) if selection.merge_weight is None
                       else selection.merge_weight.float())
            values = []
            for group in range(count):
                chosen = selection.merge_target == group
                members = hidden[0, current[selection.merge_source[chosen]]]
                values.append((members * weights[chosen, None]).sum(0) / weights[chosen].sum())
            for slot, group in zip(new_slots.tolist(), range(count), strict=True):
                hidden[0, slot] = values[group]
                original[:, slot] = original[:, current[selection.merge_anchor[group]]]
            alive[current] = False
            alive[current[selection.keep]] = True
            alive[new_slots] = True
            current = torch.cat([current[selection.keep], new_slots])
            if selection.in_clip_order:
                current = current.sort().values
            else:
                slot_start += count
    hidden = lm.norm(hidden)
    return eager_model.lm_head(hidden[0, -1]).float()
