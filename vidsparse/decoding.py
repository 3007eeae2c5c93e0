"""Greedy decoding of prefilled questions about one clip or several, together: one forward per step
for all unfinished ones; `generate` is the one-question case, prefill and all."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

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

    def join(self, other: DecodeState) -> None:
        """Go on with `other`'s rows after these: questions that join a running decoding."""
        self.clips += other.clips
        self.own = [mine.joined(theirs) for mine, theirs in zip(self.own, other.own, strict=True)]
        self.positions = torch.cat([self.positions, other.positions])
        self.new_rope = [mine or theirs for mine, theirs in zip(self.new_rope, other.new_rope, strict=True)]

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


@dataclass
class _Question:
    """A question in a running decoding: how long its answer may get, what it has got, its share of
    the steps' time, and the key its hooks are called with."""

    key: Hashable
    plan: PruningPlan | None
    block_size: int  # the prefill's visual tokens
    chooses: bool  # its plan chooses visual keys while decoding (KeyChoice)
    limit: int
    tokens: list[int] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    done: bool = False  # handed over (its row may stay until the step's forward)

    def decoded(self, seen: float) -> Decoded:
        """Its decoding, `seen` the visual keys its fed-back tokens saw after the decoding layer, summed."""
        if self.plan is None or self.plan.decoding_layer is None or not self.steps:
            mean = None
        else:  # with no choice to make (B covers the prefill's visual tokens), every token saw them all
            mean = seen / self.steps if self.chooses else float(self.block_size)
        return Decoded(self.tokens, self.steps, self.seconds, mean)


class Decoding:
    """Greedy decoding of prefilled questions, one forward a step for every unfinished one, which more
    questions may join between steps (a server's requests join the decoding already running instead
    of waiting for it to end: iteration-level scheduling, as vLLM's). Each question ends at EOS, at its
    clip's `max_new_tokens`, or when `on_token(key, token)` says False (a stop sequence met, its client
    gone); then `on_done(key, decoded)` gets it. Its share of a step's time is the step's time split
    among the questions in it."""

    def __init__(self, decoder, lm_head: torch.nn.Linear, eos_token_ids: set[int], device: torch.device,
                 on_done: Callable[[Hashable, Decoded], None],
                 on_token: Callable[[Hashable, int], bool] | None = None):
        self.decoder, self.lm_head, self.eos_token_ids, self.device = decoder, lm_head, eos_token_ids, device
        self.on_done, self.on_token = on_done, on_token
        self._reset()

    def _reset(self) -> None:
        self.questions: list[_Question] = []  # one a row of `logits`: first the state's rows, then those joining
        self.logits: torch.Tensor | None = None  # (rows, vocab): each question's next-token logits
        self.state: DecodeState | None = None  # the rows fed a token already
        self.joining: list[ClipQuestions] = []  # the last rows' clips, none fed yet (their caches still theirs)
        self.seen: torch.Tensor | None = None  # (state rows,) visual keys each one's tokens saw (choice only)

    @property
    def unfinished(self) -> int:
        return len(self.questions)

    def join(self, clips: list[ClipQuestions], keys: Sequence[Hashable]) -> None:
        """Add prefilled questions (`keys`, one each, through the clips in order) from their first logits;
        their clips' `caches` are taken over at the next step (see DecodeState)."""
        questions, each_key = [], iter(keys)
        for clip in clips:
            chooses = KeyChoice.of(clip.plan, clip.prefilled[0]) is not None  # the same for a clip's questions
            questions += [_Question(next(each_key), clip.plan, prefilled.block.size, chooses, clip.max_new_tokens)
                          for prefilled in clip.prefilled]
        logits = torch.cat([c.logits for c in clips])
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.questions += questions
        self.joining += clips

    def abandon(self) -> list[Hashable]:
        """Stop: the keys of the questions not handed over yet (a failed step: none of them can go on)."""
        keys = [question.key for question in self.questions if not question.done]
        self._reset()
        return keys

    @torch.inference_mode()
    def step(self) -> None:
        """Each question's next token; those that end are done; one forward for the others."""
        tokens = self.logits.argmax(-1)
        going, ended = [], []
        for row, (question, token) in enumerate(zip(self.questions, tokens.tolist(), strict=True)):
            if token not in self.eos_token_ids:
                question.tokens.append(token)
                wanted = self.on_token is None or self.on_token(question.key, token)
                if wanted and len(question.tokens) < question.limit:
                    going.append(row)
                    continue
            ended.append(row)
        if ended:
            self._finish(ended)
        if not going:
            self._reset()
            return
        synchronize(self.device)
        start = time.perf_counter()
        self._feed_joining()
        if ended:
            index = to_device(going, self.logits.device)
            self.state.keep(going)
            tokens, self.seen = tokens[index], self.seen[index]
            self.questions = [self.questions[row] for row in going]
        self.logits = self.lm_head(self.decoder.norm(self.state.step(tokens)))[:, -1].float()
        if any(clip.choice is not None for clip in self.state.clips):
            self.seen += self.state.seen()
        synchronize(self.device)
        share = (time.perf_counter() - start) / len(going)
        for question in self.questions:
            question.steps += 1
            question.seconds += share

    def _feed_joining(self) -> None:
        """The joining clips' rows added to the state (their buffers made: their caches let go)."""
        if not self.joining:
            return
        joined = DecodeState(self.decoder, self.joining)
        zeros = torch.zeros(sum(clip.count for clip in joined.clips), device=self.logits.device)
        if self.state is None:
            self.state, self.seen = joined, zeros
        else:
            self.state.join(joined)
            self.seen = torch.cat([self.seen, zeros])
        self.joining = []

    def _finish(self, rows: list[int]) -> None:
        """The questions at these rows are done (their visual keys seen read once, where they chose)."""
        fed = self.seen.shape[0] if self.seen is not None else 0
        chose = [row for row in rows if row < fed and self.questions[row].chooses]
        totals = dict(zip(chose, _seen_totals(self.seen, chose), strict=True)) if chose else {}
        for row in rows:
            question = self.questions[row]
            self.on_done(question.key, question.decoded(totals.get(row, 0.0)))
            question.done = True


def _seen_totals(seen: torch.Tensor, rows: list[int]) -> list[float]:
    """The visual keys these rows' tokens saw, summed: read from the device once per step that ends any."""
    return seen[to_device(rows, seen.device)].tolist()


def decode_together(decoder, lm_head: torch.nn.Linear, clips: list[ClipQuestions], eos_token_ids: set[int],
                    device: torch.device, on_token: TokenHook | None = None) -> list[Decoded]:
    """Greedy decoding of prefilled questions about one or several clips (each clip by its own plan),
    all of them from the start (`Decoding` without anyone joining later): each question's decoding, in
    order. `on_token` is called with each question's index, counting through the clips in order, and
    each token it gets. The clips' `caches` are taken over (see DecodeState)."""
    done: dict[Hashable, Decoded] = {}
    decoding = Decoding(decoder, lm_head, eos_token_ids, device, done.__setitem__, on_token)
    count = sum(len(clip.prefilled) for clip in clips)
    decoding.join(clips, range(count))
    while decoding.unfinished:
        decoding.step()
    return [done[question] for question in range(count)]


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
