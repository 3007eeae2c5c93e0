"""Greedy decoding of prefilled questions about one clip or several, together: one forward per step
for all unfinished ones; `generate` is the one-question case, prefill and all."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vidsparse.engine import Head, Prefilled, prefill_question
from vidsparse.layers import PaddedKV, RowGroup, VisualKeys, layer_step_together, rotary
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


@dataclass
class ClipQuestions:
    """Prefilled questions about one clip, ready to be decoded (alone, or with other clips' questions)."""

    plan: PruningPlan | None
    prefilled: list[Prefilled]
    caches: list[DynamicCache]  # each question's own keys/values: decoding takes them over (see DecodeState)
    logits: torch.Tensor  # (b, vocab) after each prompt
    max_new_tokens: int

    def __post_init__(self):
        if self.max_new_tokens < 1:  # the first token comes from the prefill's logits: one is always given
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")


@dataclass
class _ClipRows:
    """One clip's questions in a decoding batch: `count` consecutive rows sharing its head."""

    head: Head
    choice: KeyChoice | None
    count: int
    memory: torch.Tensor | None = None  # the method's, a row per question (choice only)
    seen: torch.Tensor | None = None  # (count,) visual keys each token saw after the layer, this step


class DecodeState:
    """Greedy decoding of questions about one or several clips together: one forward per step for all
    of them (the weights read once), each at its own positions, attending to its clip's shared head
    and its own keys/values (copied once into padded buffers that decoded tokens are written into in
    place). A clip's rows are consecutive."""

    def __init__(self, decoder, clips: list[ClipQuestions]):
        """The clips' `caches` (each question's own keys/values from prefill) are taken over: the lists are
        emptied, so that their memory goes to the buffers instead of being held twice."""
        self.decoder = decoder
        self.clips = [_ClipRows(c.prefilled[0].head, KeyChoice.of(c.plan, c.prefilled[0]), len(c.prefilled))
                      for c in clips]
        caches = [cache for c in clips for cache in c.caches]
        room = [c.max_new_tokens for c in clips for _ in c.prefilled]  # each question's tokens to come, at most
        self.own = [PaddedKV.gather([c.layers[i] for c in caches], room) for i in range(len(decoder.layers))]
        del caches
        for clip in clips:
            clip.caches.clear()
        next_positions = [p.next_positions for c in clips for p in c.prefilled]
        self.positions = to_device(next_positions, self.own[0].keys.device)
        # Layers whose positions differ from the layer before's in some question (compact positions):
        # they need their own rotary tables. Every position advances by one a step, so the pattern
        # holds for the whole decoding and is read from the host's numbers once.
        self.new_rope = [i == 0 or any(p[i] != p[i - 1] for p in next_positions) for i in range(len(decoder.layers))]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each question ((b,) ids); their next hidden states (b, 1, d)."""
        hidden = self.decoder.embed_tokens(tokens[:, None])
        rope = None
        visual: list[VisualKeys | None] = [None] * len(self.clips)  # from a clip's decoding layer on
        for i, layer in enumerate(self.decoder.layers):
            if self.new_rope[i]:
                rope = rotary(self.decoder, hidden, self.positions[None, :, i : i + 1])
            groups, first = [], 0
            for clip, seen in zip(self.clips, visual, strict=True):
                choice = clip.choice
                deciding = choice is not None and i == choice.layer
                groups.append(RowGroup(slice(first, first + clip.count), clip.head.kv[i] if i < clip.head.layers
                                       else None, VisualKeys(choice.start, choice.count) if deciding else seen,
                                       report=deciding))
                first += clip.count
            hidden, reports = layer_step_together(layer, hidden, rope, self.own[i], groups)
            for c, (clip, attention) in enumerate(zip(self.clips, reports, strict=True)):
                if attention is None:
                    continue
                choice = clip.choice  # the decoding layer's attention chooses what the next layers see
                seen, clip.memory = choice.method.select_while_decoding(
                    DecodingStep(attention, min(choice.budget, choice.count), clip.memory, choice.frames,
                                 choice.min_per_frame))
                visual[c] = VisualKeys(choice.start, choice.count, ~seen)
                clip.seen = seen.sum(-1)
        self.positions += 1
        return hidden

    def seen(self) -> torch.Tensor:
        """(b,) visual keys each row's token saw after its clip's decoding layer this step (0 for a clip
        whose plan chooses none while decoding)."""
        zeros = self.positions.new_zeros
        return torch.cat([clip.seen.float() if clip.seen is not None else zeros(clip.count, dtype=torch.float)
                          for clip in self.clips])

    def keep(self, rows: list[int]) -> None:
        """Go on with these rows only (in order; the other questions have finished)."""
        device = self.positions.device
        index = to_device(rows, device)
        self.positions = self.positions[index]
        self.own = [PaddedKV(kv.keys[index], kv.values[index], kv.lengths[index]) for kv in self.own]
        clips, first = [], 0
        for clip in self.clips:
            mine = [row - first for row in rows if first <= row < first + clip.count]
            first += clip.count
            if mine:
                if clip.memory is not None:
                    clip.memory = clip.memory[to_device(mine, device)]
                clip.count = len(mine)
                clips.append(clip)
        self.clips = clips


@torch.inference_mode()
def decode_together(decoder, lm_head: torch.nn.Linear, clips: list[ClipQuestions], eos_token_ids: set[int],
                    device: torch.device, on_token: TokenHook | None = None) -> list[Decoded]:
    """Greedy decoding of prefilled questions about one or several clips (each clip by its own plan)
    from their first logits until each meets EOS or its clip's `max_new_tokens`, or `on_token` (called
    with each question's index, counting through the clips in order, and each token it gets, as it
    gets it: a server streams them) says False (a stop sequence met, its client gone). Each one's share
    of a step's time is the step's time split among the questions in it. Returns each question's
    decoding, in the same order. The clips' `caches` are taken over (see DecodeState)."""
    limits = [c.max_new_tokens for c in clips for _ in c.prefilled]
    count = len(limits)
    tokens_of: list[list[int]] = [[] for _ in range(count)]
    steps, seconds = [0] * count, [0.0] * count
    logits = torch.cat([c.logits for c in clips])
    seen = torch.zeros(count, device=logits.device)  # visual keys each question's tokens saw (choice only)
    state = None
    active = list(range(count))  # the questions still decoding, one a row
    for step in range(max(limits)):
        tokens = logits.argmax(-1)
        going = []
        for row, (question, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            if token not in eos_token_ids:
                tokens_of[question].append(token)
                wanted = on_token is None or on_token(question, token)
                if wanted and step + 1 < limits[question]:
                    going.append(row)
        if not going:
            break
        synchronize(device)
        start = time.perf_counter()
        if state is None:
            state = DecodeState(decoder, clips)
        if len(going) < len(active):
            state.keep(going)
            tokens, active = tokens[to_device(going, logits.device)], [active[row] for row in going]
        logits = lm_head(decoder.norm(state.step(tokens)))[:, -1].float()
        if any(clip.choice is not None for clip in state.clips):
            seen.index_add_(0, to_device(active, seen.device), state.seen())
        synchronize(device)
        for question in active:
            steps[question] += 1
            seconds[question] += (time.perf_counter() - start) / len(active)
    return [Decoded(tokens_of[q], steps[q], seconds[q], mean)
            for q, mean in enumerate(_mean_seen(clips, seen, steps))]


def _mean_seen(clips: list[ClipQuestions], seen: torch.Tensor, steps: list[int]) -> list[float | None]:
    """The mean visual keys each question's fed-back tokens saw after its plan's decoding layer (None: its
    plan chooses none while decoding, or no token was fed back), from `seen`, their sum per question."""
    chooses = [KeyChoice.of(c.plan, c.prefilled[0]) is not None for c in clips]
    totals = seen.tolist() if any(chooses) else None
    means, question = [], 0
    for clip, choosing in zip(clips, chooses, strict=True):
        for prefilled in clip.prefilled:
            taken = steps[question]
            if clip.plan is None or clip.plan.decoding_layer is None or not taken:
                means.append(None)
            else:  # with no choice to make (B covers the prefill's visual tokens), every token saw them all
                means.append((totals[question] if choosing else prefilled.block.size * taken) / taken)
            question += 1
    return means


def generate(decoder, lm_head: torch.nn.Linear, prompt: PromptEmbeds, max_new_tokens: int,
             eos_token_ids: set[int], timer: StageTimer, plan: PruningPlan | None = None,
             head: Head | None = None) -> Generation:
    """Greedy decoding of one question: prefill the prompt (pruning as planned; from `head` if given),
    then one token at a time."""
    prefilled, cache, logits = prefill_question(decoder, lm_head, prompt, plan, timer, head)
    clip = ClipQuestions(plan, [prefilled], [cache], logits[None], max_new_tokens)
    del cache  # decoding takes the cache over: no second reference may keep it alive
    (decoded,) = decode_together(decoder, lm_head, [clip], eos_token_ids, prompt.embeds.device)
    return Generation(prefilled, logits, decoded)
