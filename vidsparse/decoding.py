"""Greedy decoding of one or several prefilled questions about a clip, together: one forward per
step for all unfinished ones (`engine.generate` is the one-question case)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from vidsparse.layers import PaddedKV, layer_step_together
from vidsparse.stats import synchronize

if TYPE_CHECKING:
    from vidsparse.engine import Generation


class DecodeState:
    """Greedy decoding of one or several questions about a clip together: one forward per step for
    all of them, each at its own positions, attending to the shared head and its own keys/values
    (copied once into padded buffers that decoded tokens are written into in place)."""

    def __init__(self, decoder, generations: list[Generation], max_new_tokens: int):
        self.decoder = decoder
        self.generations = generations
        self.head = generations[0].head
        self.own = [PaddedKV.gather([g.cache.layers[i] for g in generations], max_new_tokens)
                    for i in range(len(decoder.layers))]
        self.positions = torch.tensor([g.next_positions for g in generations], device=self.own[0].keys.device)
        for g in generations:
            g.cache = None  # taken over by the buffers

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each question ((b,) ids); their next hidden states (b, 1, d)."""
        hidden = self.decoder.embed_tokens(tokens[:, None])
        rope = None
        for i, layer in enumerate(self.decoder.layers):
            if i == 0 or not torch.equal(self.positions[:, i], self.positions[:, i - 1]):
                rope = self.decoder.rotary_emb(hidden, self.positions[:, i : i + 1])
            hidden = layer_step_together(layer, hidden, rope, self.head.kv[i] if i < self.head.layers else None,
                                         self.own[i])
        self.positions += 1
        for g in self.generations:
            g.decode_steps += 1
        return hidden

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these questions only (the others have finished)."""
        self.generations = [self.generations[i] for i in rows.tolist()]
        self.positions = self.positions[rows]
        self.own = [PaddedKV(kv.keys[rows], kv.values[rows], kv.lengths[rows]) for kv in self.own]


@torch.inference_mode()
def decode_together(decoder, lm_head: torch.nn.Linear, generations: list[Generation], max_new_tokens: int,
                    eos_token_ids: set[int], device: torch.device) -> None:
    """Greedy decoding of prefilled questions (their `first_logits` set) until each meets EOS or
    `max_new_tokens`; each one's tokens land in its `token_ids`, and its share of each step's time
    (split among the questions in the step) in its `decode_seconds`."""
    state = None
    logits = torch.stack([g.first_logits for g in generations])
    active = list(generations)
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        going = []
        for row, (g, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            if token not in eos_token_ids:
                g.token_ids.append(token)
                if step + 1 < max_new_tokens:
                    going.append(row)
        if not going:
            return
        synchronize(device)
        start = time.perf_counter()
        if state is None:
            state = DecodeState(decoder, active, max_new_tokens)
        if len(going) < len(active):
            rows = torch.tensor(going, device=logits.device)
            state.keep(rows)
            tokens, active = tokens[rows], state.generations
        logits = lm_head(decoder.norm(state.step(tokens)))[:, -1].float()
        synchronize(device)
        for g in active:
            g.decode_seconds += (time.perf_counter() - start) / len(active)
