"""Prefill through the decoder layers with pruning stages, then greedy decoding on per-layer KV caches.

A prompt is cut where the question starts. The *head* is the text before the video and the visual
block; the *question* is every token after it. Under causal attention the head's states do not
depend on the question, so `prefill_head` runs the head once through the layers before the plan's
first question-guided stage, applying the question-independent stages on the way, and every
question about the clip continues from it with `prefill`, attending to the head's keys/values in
place (`vidsparse.layers`), never copying them. `ask` is the one-question case of the same path.

An explicit loop over `decoder.layers` (no `generate()`): a stage "after layer p" runs layers up to
p, lets the method choose from layer p's attention, removes/merges visual rows of layer p's output,
and the following layers see (and cache) only what is left. Layers keep caches of different
lengths. Several questions about a clip, and about clips whose heads cover the same layers, go
through the layers they share with their heads in one batch (`question_rows`); decoding them
together is `vidsparse.decoding`.

Every step returns what it computed (gpt-fast's `prefill` / `decode_one_token` style): a `Head`, a
question's `Prefilled` facts with its own key/value cache and last hidden rows, the first logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vidsparse.layers import HeadKV, rotary, run_after_head, run_layers
from vidsparse.models.visual import PromptEmbeds
from vidsparse.pruning.base import PromptText, PruningPlan, Selection, StageInput
from vidsparse.stage import VisualBlock, apply_selection, attention_rows, row_queries
from vidsparse.stats import StageTimer
from vidsparse.transfer import arange_of, to_device


@dataclass(frozen=True)
class StageRecord:
    layer: int
    visual_out: int
    selection: Selection


@dataclass
class Head:
    """A clip's prompt head after the layers that all its questions share; read-only once built."""

    kv: list[HeadKV]  # the head's keys/values at each shared layer (layers 0 .. len(kv) - 1)
    hidden: torch.Tensor  # (1, n, d) the head's output of the last shared layer (embeddings if none)
    positions: torch.Tensor  # (P, 1, n) RoPE positions of those rows
    block: VisualBlock  # the visual tokens left after the question-independent stages
    stages: list[StageRecord]  # those stages
    tokens_per_layer: list[int]  # head rows entering each shared layer
    visual_per_layer: list[int]
    length: int  # head rows in the prompt, before any pruning
    text_start: int  # RoPE position of the first row after the head (PromptEmbeds.text_start)
    max_position: int  # the head's largest RoPE position
    generator: torch.Generator | None  # the plan's generator after the shared stages

    @property
    def layers(self) -> int:
        return len(self.kv)

    def question_start(self, layer: int, keep: bool) -> int:
        """RoPE position of a question's first row at shared `layer` (keep: after the original head;
        compact: after the head's rows at that layer)."""
        return self.text_start if keep else self.tokens_per_layer[layer]


# A question's rows after the shared layers: (last shared layer's output, that layer's queries of the
# rows (1, H, r, hd), a cache holding the rows' keys/values at the shared layers).
QuestionRows = tuple[torch.Tensor, torch.Tensor, DynamicCache]


@dataclass(frozen=True)
class Prefilled:
    """What one question's prefill computed, besides its own key/value cache and last hidden rows."""

    head: Head  # shared with the clip's other questions
    stages: list[StageRecord]  # every stage of the plan that ran, the head's first
    block: VisualBlock  # the visual tokens left after the last stage
    tokens_per_layer: list[int]  # prompt tokens entering each decoder layer in prefill
    visual_per_layer: list[int]  # visual tokens entering each decoder layer in prefill
    # RoPE position of the next token, per layer: the positions a full recomputation would give it
    # (keep: after the original prompt's largest position; compact: after the layer's own, shortened,
    # sequence).
    next_positions: list[int]
    own_lengths: list[int]  # this question's own cached rows per layer after prefill
    token_kv_bytes: int  # keys + values of one token at one layer
    facts: object | None  # what the method learned about this question (Method.prepare)

    def kv_lengths(self, decode_steps: int) -> list[int]:
        """Keys each layer attends to after `decode_steps` fed-back tokens: the shared head's, this
        question's prompt rows and its fed-back tokens."""
        return [(self.head.kv[i].keys.shape[-2] if i < self.head.layers else 0) + own + decode_steps
                for i, own in enumerate(self.own_lengths)]

    def kv_bytes(self, decode_steps: int) -> int:
        """Bytes of keys/values this question reads after `decode_steps` fed-back tokens (the head's included)."""
        return self.token_kv_bytes * sum(self.kv_lengths(decode_steps))


# What a question's prefill returns: its facts, its own keys/values (decoding takes them over) and the
# last layer's hidden states of its rows after the head.
QuestionPrefill = tuple[Prefilled, DynamicCache, torch.Tensor]


def _check_attention(decoder) -> None:
    impl = decoder.config._attn_implementation
    if impl not in ("sdpa", "flash_attention_2"):
        raise ValueError(f"the engine relies on SDPA's implicit causal mask; the model uses {impl!r}")


def _stages(plan: PruningPlan | None, num_visual: int) -> list[int]:
    return plan.stages if plan and plan.budget < num_visual else []  # B >= n: the contract says no pruning


def _choose(plan: PruningPlan, index: int, stages: list[int], prompt: PromptEmbeds, block: VisualBlock,
            visual_hidden: torch.Tensor, attention: torch.Tensor | None, generator: torch.Generator,
            facts: object | None = None) -> Selection:
    visual = prompt.visual
    frames, rows, cols = block.places()
    return plan.method.select(StageInput(
        index=index, num_stages=len(stages), layer=stages[index], num_visual=len(visual),
        budget=min(plan.budget, len(visual)), hidden=visual_hidden, frames=frames, rows=rows, cols=cols,
        attention=attention, min_per_frame=plan.min_per_frame, generator=generator, grid=visual.grid(),
        saliency=None if prompt.saliency is None else prompt.saliency[block.origin],
        frame_features=prompt.frame_features, facts=facts,
    ))


@torch.inference_mode()
def prefill_head(decoder, prompt: PromptEmbeds, plan: PruningPlan | None, timer: StageTimer) -> Head:
    """The prompt's head (up to the end of its visual block) through the layers before the plan's
    first question-guided stage, or through every layer if it has none, with the question-independent
    stages applied. Only `prompt`'s head rows, visual map and tower outputs are read. In inference
    mode whoever calls it: a checkpoint's weights require gradients, and a head built with autograd on
    would keep every layer's activations alive as long as the head (a cached clip: for ever)."""
    _check_attention(decoder)
    visual = prompt.visual
    device = prompt.embeds.device
    if not len(visual):
        raise ValueError("the engine needs a prompt with a visual block")
    length = prompt.head_length
    hidden = prompt.embeds[:, :length]
    block = VisualBlock(visual.start, torch.arange(len(visual), device=device),
                        torch.zeros(len(visual), dtype=torch.bool, device=device),
                        to_device(torch.stack([visual.frame, visual.row, visual.col]), device))
    stages = _stages(plan, len(visual))
    first_guided = next((i for i, layer in enumerate(stages) if plan.method.reads_question(layer)), len(stages))
    shared = stages[first_guided] + 1 if first_guided < len(stages) else len(decoder.layers)
    positions = to_device(prompt.rope_positions[..., :length], device)
    cache = DynamicCache(config=decoder.config)
    generator = torch.Generator().manual_seed(plan.seed) if plan else None
    tokens_per_layer: list[int] = []
    visual_per_layer: list[int] = []
    records: list[StageRecord] = []

    def layers(hidden: torch.Tensor, upto: int) -> torch.Tensor:
        return _counted_layers(decoder, hidden, positions, cache, range(len(tokens_per_layer), upto), block.size,
                               tokens_per_layer, visual_per_layer)

    for index in range(first_guided):
        hidden = layers(hidden, stages[index] + 1)
        with timer.stage("pruning"):
            selection = _choose(plan, index, stages, prompt, block, hidden[0, block.start : block.end], None,
                                generator)
            hidden, positions, block = apply_selection(hidden, positions, block, selection, plan.positions)
        records.append(StageRecord(stages[index], block.size, selection))
    hidden = layers(hidden, shared)
    kv = [HeadKV(cache.layers[i].keys, cache.layers[i].values) for i in range(shared)]
    return Head(kv, hidden, positions, block, records, tokens_per_layer, visual_per_layer, length, prompt.text_start,
                prompt.head_max_position, generator)


def prefill(decoder, prompt: PromptEmbeds, plan: PruningPlan | None, timer: StageTimer,
            head: Head | None = None) -> QuestionPrefill:
    """Run the prompt through every layer, pruning at the plan's stages, continuing from `head` (built
    from this prompt if not given: a head serves every prompt with the same head rows)."""
    if head is None:
        head = prefill_head(decoder, prompt, plan, timer)
    ((rows,),) = question_rows(decoder, [ClipPrompts(head, [prompt], plan)])
    return _finish(decoder, prompt, plan, timer, head, *rows)


@dataclass(frozen=True)
class ClipPrompts:
    """Prompts about one clip, to go through the layers they share with its `head` (`question_rows`)."""

    head: Head
    prompts: list[PromptEmbeds]
    plan: PruningPlan | None


@torch.inference_mode()
def question_rows(decoder, clips: list[ClipPrompts]) -> list[list[QuestionRows]]:
    """Each clip's prompts' rows after its head through the layers the head covers, every clip's prompts
    in one batch (their heads must cover the same number of layers): per clip, per prompt (last shared
    layer's output, its input, a cache holding the rows' keys/values)."""
    if len({clip.head.layers for clip in clips}) > 1:
        raise ValueError("question_rows batches clips whose heads cover the same layers")
    questions, starts, heads = [], [], []
    for clip in clips:
        keep = clip.plan is None or clip.plan.positions == "keep"
        first = len(questions)
        questions += [p.embeds[0, clip.head.length :] for p in clip.prompts]
        starts += [[clip.head.question_start(i, keep) for i in range(clip.head.layers)]] * len(clip.prompts)
        heads.append((slice(first, len(questions)), clip.head.kv))
    padded = torch.nn.utils.rnn.pad_sequence(questions, batch_first=True)
    out, queries, kv = run_after_head(decoder, heads, padded,
                                      to_device(starts, padded.device).reshape(len(questions), -1))
    rows = []
    for i, question in enumerate(questions):
        count = question.shape[0]
        cache = DynamicCache(config=decoder.config)
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys[i : i + 1, :, :count], values[i : i + 1, :, :count], layer)
        rows.append((out[i : i + 1, :count], queries[i : i + 1, :, :count], cache))
    mine = iter(rows)
    return [[next(mine) for _ in clip.prompts] for clip in clips]


def _finish(decoder, prompt: PromptEmbeds, plan: PruningPlan | None, timer: StageTimer, head: Head,
            question: torch.Tensor, queries: torch.Tensor, cache: DynamicCache) -> QuestionPrefill:
    """A question's prefill after its rows went through the shared layers: its question-guided
    stages and the layers after them, on its own sequence."""
    device = prompt.embeds.device
    num_layers = len(decoder.layers)
    count = question.shape[1]
    keep = plan is None or plan.positions == "keep"
    records = list(head.stages)
    tokens_per_layer = [n + count for n in head.tokens_per_layer]
    visual_per_layer = list(head.visual_per_layer)
    block, facts = head.block, None
    stages = _stages(plan, len(prompt.visual))
    index = len(head.stages)
    if index == len(stages):
        hidden = question  # every layer was shared: the question's rows are the whole story
    else:
        method = plan.method
        generator = torch.Generator().set_state(head.generator.get_state())
        with timer.stage("pruning"):  # the first question-guided stage, after the last shared layer
            facts = method.prepare(PromptText(prompt.embeds[0], prompt.visual.start, len(prompt.visual),
                                              head.length, prompt.suffix_words))
            layer = head.layers - 1  # the question's rows query the head's keys and their own
            rows = arange_of(method.query_rows(count, facts), device)
            hidden, positions, block, record = _question_stage(
                decoder, plan, index, stages, prompt, generator, facts, head.hidden, head.positions, block,
                queries[:, :, rows], head.hidden.shape[1] + rows, [head.kv[layer].keys, cache.layers[layer].keys])
            hidden = torch.cat([hidden, question], 1)
            text = head.text_start + torch.arange(count, device=device)
            positions = (torch.arange(hidden.shape[1], device=device)[None, None] if not keep
                         else torch.cat([positions, text.expand(positions.shape[0], 1, count)], -1))
        records.append(record)
        hidden, block = _guided_stages(decoder, prompt, plan, timer, cache, records, tokens_per_layer,
                                       visual_per_layer, facts, hidden, positions, block, index + 1, generator)
    keys = cache.layers[0].keys
    prefilled = Prefilled(
        head, records, block, tokens_per_layer, visual_per_layer,
        next_positions=([max(head.max_position + 1, head.text_start + count)] * num_layers if keep
                        else list(tokens_per_layer)),
        own_lengths=[layer.keys.shape[-2] for layer in cache.layers],
        token_kv_bytes=2 * keys.shape[1] * keys.shape[-1] * keys.element_size(), facts=facts)
    return prefilled, cache, hidden[:, -count:]


def _question_stage(decoder, plan: PruningPlan, index: int, stages: list[int], prompt: PromptEmbeds,
                    generator: torch.Generator, facts: object | None, hidden: torch.Tensor, positions: torch.Tensor,
                    block: VisualBlock, queries: torch.Tensor, key_positions: torch.Tensor, keys: list[torch.Tensor],
                    ) -> tuple[torch.Tensor, torch.Tensor, VisualBlock, StageRecord]:
    """One question-guided stage, after layer `stages[index]`: the attention of the method's query
    rows (their `queries` at that layer, after RoPE) over `keys`, the method's choice from the visual
    block's part of it, and that choice applied to the layer's output `hidden`."""
    attention = attention_rows(decoder.layers[stages[index]], queries, key_positions, keys)
    selection = _choose(plan, index, stages, prompt, block, hidden[0, block.start : block.end],
                        attention[:, block.start : block.end], generator, facts)
    hidden, positions, block = apply_selection(hidden, positions, block, selection, plan.positions)
    return hidden, positions, block, StageRecord(stages[index], block.size, selection)


def _counted_layers(decoder, hidden: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, layers: range,
                    visual: int, tokens_per_layer: list[int], visual_per_layer: list[int]) -> torch.Tensor:
    """run_layers, recording how many tokens (and visual tokens) enter each layer."""
    tokens_per_layer.extend([hidden.shape[1]] * len(layers))
    visual_per_layer.extend([visual] * len(layers))
    return run_layers(decoder, hidden, positions, rotary(decoder, hidden, positions), cache, layers)


def _guided_stages(decoder, prompt: PromptEmbeds, plan: PruningPlan, timer: StageTimer, cache: DynamicCache,
                   records: list[StageRecord], tokens_per_layer: list[int], visual_per_layer: list[int],
                   facts: object | None, hidden: torch.Tensor, positions: torch.Tensor, block: VisualBlock,
                   first: int, generator: torch.Generator) -> tuple[torch.Tensor, VisualBlock]:
    """After the first question-guided stage: this question's own sequence through the remaining
    layers, with the plan's remaining stages (nothing shared any more), recorded in `records` and the
    per-layer counts as it goes; returns the last layer's output and the visual block left."""
    stages = _stages(plan, len(prompt.visual))
    separators = prompt.head_length - prompt.visual.end  # head rows after the visual block

    def layers(hidden: torch.Tensor, upto: int) -> torch.Tensor:
        return _counted_layers(decoder, hidden, positions, cache, range(len(tokens_per_layer), upto), block.size,
                               tokens_per_layer, visual_per_layer)

    for index in range(first, len(stages)):
        layer_input = layers(hidden, stages[index])
        hidden = layers(layer_input, stages[index] + 1)
        with timer.stage("pruning"):
            text = block.end + separators  # the question's first row
            rows = text + arange_of(plan.method.query_rows(hidden.shape[1] - text, facts), hidden.device)
            queries = row_queries(decoder.layers[stages[index]], layer_input[:, rows],
                                  rotary(decoder, hidden, positions[..., rows]))
            hidden, positions, block, record = _question_stage(
                decoder, plan, index, stages, prompt, generator, facts, hidden, positions, block, queries, rows,
                [cache.layers[stages[index]].keys])
        records.append(record)
    return layers(hidden, len(decoder.layers)), block


def prefill_question(decoder, lm_head: torch.nn.Linear, prompt: PromptEmbeds, plan: PruningPlan | None,
                     timer: StageTimer, head: Head | None = None) -> tuple[Prefilled, DynamicCache, torch.Tensor]:
    """`prefill` and the logits of the first answer token (vocab,), timed as "prefill"."""
    with timer.stage("prefill"), torch.inference_mode():
        prefilled, cache, hidden = prefill(decoder, prompt, plan, timer, head=head)
        (logits,) = first_logits(decoder, lm_head, [hidden[0, -1:]])
    return prefilled, cache, logits


def finish_question(decoder, prompt: PromptEmbeds, plan: PruningPlan | None, timer: StageTimer, head: Head,
                    rows: QuestionRows) -> QuestionPrefill:
    """The rest of one question's prefill after `question_rows`; its hidden rows are the last one's
    final state (1, d), for `first_logits`."""
    with timer.stage("prefill"), torch.inference_mode():
        prefilled, cache, hidden = _finish(decoder, prompt, plan, timer, head, *rows)
    return prefilled, cache, hidden[0, -1:]


@torch.inference_mode()
def first_logits(decoder, lm_head: torch.nn.Linear, last: list[torch.Tensor]) -> torch.Tensor:
    """Each question's logits after its prompt (b, vocab), from its last row, in one product with the LM head."""
    return lm_head(decoder.norm(torch.cat(last))).float()
