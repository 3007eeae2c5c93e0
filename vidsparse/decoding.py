"""Greedy decoding of one or several prefilled questions about a clip, together: one forward per
step for all unfinished ones; `generate` is the one-question case, prefill and all."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vidsparse.engine import Head, Prefilled, prefill_question
from vidsparse.layers import PaddedKV, VisualKeys, layer_step_together, rotary
from vidsparse.models.visual import PromptEmbeds
from vidsparse.pruning.base import DecodingStep, Method, PruningPlan
from vidsparse.stats import StageTimer, synchronize
from vidsparse.transfer import to_device

# Called with a question's index and each token it gets, as it gets it; False ends its answer there.
TokenHook = Callable[[int, int], bool]


@dataclass(frozen=True)
class Decoded:
    """One question's decoding: its tokens (EOS excluded), how many were fed back through the layers,
    and its share of the decoding time."""

    token_ids: list[int]
    steps: int
    seconds: float
    # Mean visual keys a fed-back token saw after the plan's decoding layer (None: the plan chooses
    # none while decoding, every token saw the prefill's; or no token was fed back).
    visual_while_decoding: float | None


@dataclass(frozen=True)
class Generation:
    """One question answered by `generate`: its prefill, the logits after its prompt, its decoding."""

    prefilled: Prefilled
    first_logits: torch.Tensor  # (vocab,)
    decoded: Decoded


@dataclass(frozen=True)
class KeyChoice:
    """A plan's choice of visual keys while decoding: after `layer`, a step's new tokens see what the
    method chooses from their attention there among the `count` visual keys from column `start`."""

    method: Method
    layer: int
    start: int
    count: int
    budget: int
    frames: torch.Tensor  # (count,) frame of each visual key
    min_per_frame: int

    @classmethod
    def of(cls, plan: PruningPlan | None, prefilled: Prefilled) -> KeyChoice | None:
        """The plan's, if it chooses while decoding and the prefill left more visual tokens than B (the
        visual block is the prefill's last, the same at every layer from the decoding layer on)."""
        block = prefilled.block
        if plan is None or plan.decoding_layer is None or plan.budget >= block.size:
            return None
        return cls(plan.method, plan.decoding_layer, block.start, block.size, plan.budget, block.places()[0],
                   plan.min_per_frame)


class DecodeState:
    """Greedy decoding of one or several questions about a clip together: one forward per step for
    all of them, each at its own positions, attending to the shared head and its own keys/values
    (copied once into padded buffers that decoded tokens are written into in place)."""

    def __init__(self, decoder, head: Head, caches: list[DynamicCache], next_positions: list[list[int]],
                 max_new_tokens: int, choice: KeyChoice | None):
        """`caches` (each question's own keys/values from prefill) are taken over: the list is emptied,
        so that their memory goes to the buffers instead of being held twice."""
        self.decoder = decoder
        self.head = head
        self.choice = choice
        self.memory: torch.Tensor | None = None  # the method's, a row per question (choice only)
        self.seen: torch.Tensor | None = None  # (b,) visual keys each token saw after the layer, this step
        self.own = [PaddedKV.gather([c.layers[i] for c in caches], max_new_tokens) for i in range(len(decoder.layers))]
        caches.clear()
        self.positions = to_device(next_positions, self.own[0].keys.device)
        # Layers whose positions differ from the layer before's in some question (compact positions):
        # they need their own rotary tables. Every position advances by one a step, so the pattern
        # holds for the whole decoding and is read from the host's numbers once.
        self.new_rope = [i == 0 or any(p[i] != p[i - 1] for p in next_positions) for i in range(len(decoder.layers))]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each question ((b,) ids); their next hidden states (b, 1, d)."""
        hidden = self.decoder.embed_tokens(tokens[:, None])
        rope, visual, choice = None, None, self.choice
        for i, layer in enumerate(self.decoder.layers):
            if self.new_rope[i]:
                rope = rotary(self.decoder, hidden, self.positions[None, :, i : i + 1])
            deciding = choice is not None and i == choice.layer
            hidden, attention = layer_step_together(
                layer, hidden, rope, self.head.kv[i] if i < self.head.layers else None, self.own[i],
                VisualKeys(choice.start, choice.count) if deciding else visual, report=deciding)
            if deciding:  # the decoding layer's attention chooses what the next layers see
                seen, self.memory = choice.method.select_while_decoding(
                    DecodingStep(attention, min(choice.budget, choice.count), self.memory, choice.frames,
                                 choice.min_per_frame))
                visual = VisualKeys(choice.start, choice.count, ~seen)
                self.seen = seen.sum(-1)
        self.positions += 1
        return hidden

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (the other questions have finished)."""
        self.positions = self.positions[rows]
        self.own = [PaddedKV(kv.keys[rows], kv.values[rows], kv.lengths[rows]) for kv in self.own]
        if self.memory is not None:
            self.memory = self.memory[rows]


@torch.inference_mode()
def decode_together(decoder, lm_head: torch.nn.Linear, plan: PruningPlan | None, prefilled: list[Prefilled],
                    caches: list[DynamicCache], logits: torch.Tensor, max_new_tokens: int, eos_token_ids: set[int],
                    device: torch.device, on_token: TokenHook | None = None) -> list[Decoded]:
    """Greedy decoding of prefilled questions about one clip (by `plan`) from their first `logits`
    (b, vocab) until each meets EOS or `max_new_tokens`, or `on_token` (called with each question's
    index and each token it gets, as it gets it: a server streams them) says False (a stop sequence
    met, its client gone); each one's share of a step's time is the step's time split among the
    questions in it. `caches` are taken over (see DecodeState)."""
    count = len(prefilled)
    tokens_of: list[list[int]] = [[] for _ in range(count)]
    steps, seconds = [0] * count, [0.0] * count
    choice = KeyChoice.of(plan, prefilled[0])
    seen = torch.zeros(count, device=logits.device)  # visual keys each question's tokens saw (choice only)
    state = None
    active = list(range(count))  # the questions still decoding, one a row
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        going = []
        for row, (question, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            if token not in eos_token_ids:
                tokens_of[question].append(token)
                wanted = on_token is None or on_token(question, token)
                if wanted and step + 1 < max_new_tokens:
                    going.append(row)
        if not going:
            break
        synchronize(device)
        start = time.perf_counter()
        if state is None:
            state = DecodeState(decoder, prefilled[0].head, caches, [p.next_positions for p in prefilled],
                                max_new_tokens, choice)
        if len(going) < len(active):
            rows = to_device(going, logits.device)
            state.keep(rows)
            tokens, active = tokens[rows], [active[row] for row in going]
        logits = lm_head(decoder.norm(state.step(tokens)))[:, -1].float()
        if choice is not None:
            seen.index_add_(0, to_device(active, seen.device), state.seen.float())
        synchronize(device)
        for question in active:
            steps[question] += 1
            seconds[question] += (time.perf_counter() - start) / len(active)
    if plan is None or plan.decoding_layer is None:
        mean_seen = [None] * count
    else:  # with no choice to make (B covers the prefill's visual tokens), every token saw them all
        totals = (seen.tolist() if choice is not None
                  else [p.block.size * n for p, n in zip(prefilled, steps, strict=True)])
        mean_seen = [total / taken if taken else None for total, taken in zip(totals, steps, strict=True)]
    return [Decoded(tokens_of[i], steps[i], seconds[i], mean_seen[i]) for i in range(count)]


def generate(decoder, lm_head: torch.nn.Linear, prompt: PromptEmbeds, max_new_tokens: int,
             eos_token_ids: set[int], timer: StageTimer, plan: PruningPlan | None = None,
             head: Head | None = None) -> Generation:
    """Greedy decoding of one question: prefill the prompt (pruning as planned; from `head` if given),
    then one token at a time."""
    prefilled, cache, logits = prefill_question(decoder, lm_head, prompt, plan, timer, head)
    caches = [cache]
    del cache  # decoding takes the cache over: no second reference may keep it alive
    (decoded,) = decode_together(decoder, lm_head, plan, [prefilled], caches, logits[None], max_new_tokens,
                                 eos_token_ids, prompt.embeds.device)
    return Generation(prefilled, logits, decoded)
