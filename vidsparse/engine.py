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
lengths. Batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from vidsparse.layers import HeadKV, layer_after_head, run_layers
from vidsparse.models.video_llava import PromptEmbeds
from vidsparse.pruning.base import PromptText, PruningPlan, Selection, StageInput
from vidsparse.pruning.stage import VisualBlock, apply_selection, attention_rows
from vidsparse.stats import StageTimer


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
    positions: torch.Tensor  # (1, n) RoPE positions of those rows
    block: VisualBlock  # the visual tokens left after the question-independent stages
    stages: list[StageRecord]  # those stages
    tokens_per_layer: list[int]  # head rows entering each shared layer
    visual_per_layer: list[int]
    length: int  # head rows in the prompt, before any pruning
    generator: torch.Generator | None  # the plan's generator after the shared stages

    @property
    def layers(self) -> int:
        return len(self.kv)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv for t in (kv.keys, kv.values))


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS excluded
    head: Head  # shared with the clip's other questions
    cache: DynamicCache  # this question's own keys/values at every layer (after the head's, where shared)
    tokens_per_layer: list[int]  # prompt tokens entering each decoder layer in prefill
    visual_per_layer: list[int]  # visual tokens entering each decoder layer in prefill
    first_logits: torch.Tensor  # (vocab,) logits after the prompt
    stages: list[StageRecord] = field(default_factory=list)
    block: VisualBlock | None = None  # the visual tokens left after the last stage
    # RoPE position of the next token, per layer: the positions a full recomputation would give it
    # (keep: after the original prompt; compact: after the layer's own, shortened, sequence).
    next_positions: list[int] = field(default_factory=list)

    def kv_lengths(self) -> list[int]:
        """Keys each layer attends to: the shared head's and this question's own."""
        return [(self.head.kv[i].keys.shape[-2] if i < self.head.layers else 0) + layer.keys.shape[-2]
                for i, layer in enumerate(self.cache.layers)]

    def kv_bytes(self) -> int:
        """Bytes of keys/values this question reads: the shared head's and its own."""
        own = sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))
        return own + self.head.kv_bytes()


def _check_attention(decoder) -> None:
    impl = decoder.config._attn_implementation
    if impl not in ("sdpa", "flash_attention_2"):
        raise ValueError(f"the engine relies on SDPA's implicit causal mask; the model uses {impl!r}")


def _stages(plan: PruningPlan | None, num_visual: int) -> list[int]:
    return plan.stages if plan and plan.budget < num_visual else []  # B >= n: the contract says no pruning


def _choose(plan: PruningPlan, index: int, stages: list[int], prompt: PromptEmbeds, block: VisualBlock,
            visual_hidden: torch.Tensor, attention: torch.Tensor | None, generator: torch.Generator) -> Selection:
    device = visual_hidden.device
    visual = prompt.visual
    origin = block.origin
    return plan.method.select(StageInput(
        index=index, num_stages=len(stages), layer=stages[index], num_visual=len(visual),
        budget=min(plan.budget, len(visual)), hidden=visual_hidden,
        frames=visual.frame.to(device)[origin], rows=visual.row.to(device)[origin], cols=visual.col.to(device)[origin],
        attention=attention, min_per_frame=plan.min_per_frame, generator=generator,
        saliency=None if prompt.saliency is None else prompt.saliency.to(device)[origin],
        frame_features=prompt.frame_features,
    ))


def prefill_head(decoder, prompt: PromptEmbeds, plan: PruningPlan | None, timer: StageTimer,
                 replay: list[Selection] | None = None) -> Head:
    """The prompt's head (up to the end of its visual block) through the layers before the plan's
    first question-guided stage, or through every layer if it has none, with the question-independent
    stages applied. Only `prompt`'s head rows, visual map and tower outputs are read."""
    _check_attention(decoder)
    visual = prompt.visual
    device = prompt.embeds.device
    if not len(visual):
        raise ValueError("the engine needs a prompt with a visual block")
    length = int(visual.positions[-1]) + 1
    hidden = prompt.embeds[:, :length]
    block = VisualBlock(int(visual.positions[0]), torch.arange(len(visual), device=device),
                        torch.zeros(len(visual), dtype=torch.bool, device=device))
    stages = _stages(plan, len(visual))
    first_guided = next((i for i, layer in enumerate(stages) if plan.method.reads_question(layer)), len(stages))
    shared = stages[first_guided] + 1 if first_guided < len(stages) else len(decoder.layers)
    positions = torch.arange(length, device=device)[None]
    cache = DynamicCache(config=decoder.config)
    generator = torch.Generator().manual_seed(plan.seed) if plan else None
    tokens_per_layer: list[int] = []
    visual_per_layer: list[int] = []
    records: list[StageRecord] = []

    def layers(hidden: torch.Tensor, upto: int) -> torch.Tensor:
        done = len(tokens_per_layer)
        tokens_per_layer.extend([hidden.shape[1]] * (upto - done))
        visual_per_layer.extend([block.size] * (upto - done))
        return run_layers(decoder, hidden, positions, decoder.rotary_emb(hidden, positions), cache, range(done, upto))

    for index in range(first_guided):
        hidden = layers(hidden, stages[index] + 1)
        with timer.stage("pruning"):
            selection = replay[index] if replay is not None else _choose(
                plan, index, stages, prompt, block, hidden[0, block.start : block.end], None, generator)
            hidden, positions, block = apply_selection(hidden, positions, block, selection, plan.positions)
        records.append(StageRecord(stages[index], block.size, selection))
    hidden = layers(hidden, shared)
    kv = [HeadKV(cache.layers[i].keys, cache.layers[i].values) for i in range(shared)]
    return Head(kv, hidden, positions, block, records, tokens_per_layer, visual_per_layer, length, generator)


def prefill(decoder, prompt: PromptEmbeds, plan: PruningPlan | None, timer: StageTimer,
            replay: list[Selection] | None = None, head: Head | None = None) -> tuple[torch.Tensor, Generation]:
    """Run the prompt through every layer, pruning at the plan's stages, continuing from `head` (built
    from this prompt if not given: a head serves every prompt with the same head rows). `replay`
    re-applies the selections of an earlier run instead of asking the method (the no-cache reference
    uses it). Returns the last layer's hidden states of the rows after the head and the Generation."""
    if head is None:
        head = prefill_head(decoder, prompt, plan, timer, replay)
    device = prompt.embeds.device
    num_layers = len(decoder.layers)
    question = prompt.embeds[:, head.length :]
    count = question.shape[1]
    keep = plan is None or plan.positions == "keep"
    cache = DynamicCache(config=decoder.config)
    generation = Generation([], head, cache, [], [], torch.empty(0), list(head.stages), head.block)
    local = torch.arange(count, device=device)

    def start(layer: int) -> int:  # the question's first RoPE position at a shared layer
        return head.length if keep else head.tokens_per_layer[layer]

    layer_input = question
    for i in range(head.layers):  # the question's rows after the shared head
        layer_input = question
        rope = decoder.rotary_emb(question, (start(i) + local)[None])
        question = layer_after_head(decoder.layers[i], question, rope, head.kv[i], cache, i)
        generation.tokens_per_layer.append(head.tokens_per_layer[i] + count)
        generation.visual_per_layer.append(head.visual_per_layer[i])
    stages = _stages(plan, len(prompt.visual))
    index = len(head.stages)
    if index == len(stages):
        hidden = question  # every layer was shared: the question's rows are the whole story
    else:
        method = plan.method
        generator = torch.Generator().set_state(head.generator.get_state())
        if replay is None:
            with timer.stage("pruning"):
                method.prepare(PromptText(prompt.embeds[0], head.block.start, len(prompt.visual), prompt.suffix_words))
        block = head.block
        with timer.stage("pruning"):  # the first question-guided stage, after the last shared layer
            if replay is not None:
                selection = replay[index]
            else:
                layer = head.layers - 1
                rows = method.query_rows(count).to(device)
                rope = decoder.rotary_emb(question, (start(layer) + rows)[None])
                n_head = head.hidden.shape[1]
                attention = attention_rows(decoder.layers[layer], layer_input[:, rows], rope, n_head + rows,
                                           [head.kv[layer].keys, cache.layers[layer].keys])
                selection = _choose(plan, index, stages, prompt, block, head.hidden[0, block.start : block.end],
                                    attention[:, block.start : block.end], generator)
            hidden, positions, block = apply_selection(head.hidden, head.positions, block, selection, plan.positions)
            hidden = torch.cat([hidden, question], 1)
            positions = (torch.arange(hidden.shape[1], device=device)[None] if not keep
                         else torch.cat([positions, head.length + local[None]], 1))
        generation.stages.append(StageRecord(stages[index], block.size, selection))
        hidden = _guided_stages(decoder, prompt, plan, timer, replay, generation, hidden, positions, block,
                                index + 1, generator)
    generation.next_positions = ([head.length + count] * num_layers if keep else list(generation.tokens_per_layer))
    return hidden[:, -count:], generation


def _guided_stages(decoder, prompt: PromptEmbeds, plan: PruningPlan, timer: StageTimer,
                   replay: list[Selection] | None, generation: Generation, hidden: torch.Tensor,
                   positions: torch.Tensor, block: VisualBlock, first: int, generator: torch.Generator) -> torch.Tensor:
    """After the first question-guided stage: this question's own sequence through the remaining
    layers, with the plan's remaining stages (nothing shared any more)."""
    stages = _stages(plan, len(prompt.visual))
    cache = generation.cache
    layer = stages[first - 1] + 1

    def layers(hidden: torch.Tensor, upto: int) -> torch.Tensor:
        nonlocal layer
        generation.tokens_per_layer.extend([hidden.shape[1]] * (upto - layer))
        generation.visual_per_layer.extend([block.size] * (upto - layer))
        rope = decoder.rotary_emb(hidden, positions)
        hidden, layer = run_layers(decoder, hidden, positions, rope, cache, range(layer, upto)), upto
        return hidden

    for index in range(first, len(stages)):
        layer_input = layers(hidden, stages[index])
        hidden = layers(layer_input, stages[index] + 1)
        with timer.stage("pruning"):
            if replay is not None:
                selection = replay[index]
            else:
                rows = block.end + plan.method.query_rows(hidden.shape[1] - block.end).to(hidden.device)
                cos, sin = decoder.rotary_emb(hidden, positions)
                attention = attention_rows(decoder.layers[stages[index]], layer_input[:, rows],
                                           (cos[:, rows], sin[:, rows]), rows, [cache.layers[stages[index]].keys])
                selection = _choose(plan, index, stages, prompt, block, hidden[0, block.start : block.end],
                                    attention[:, block.start : block.end], generator)
            hidden, positions, block = apply_selection(hidden, positions, block, selection, plan.positions)
        generation.stages.append(StageRecord(stages[index], block.size, selection))
    generation.block = block
    return layers(hidden, len(decoder.layers))


@torch.inference_mode()
def generate(decoder, lm_head: torch.nn.Linear, prompt: PromptEmbeds, max_new_tokens: int,
             eos_token_ids: set[int], timer: StageTimer, plan: PruningPlan | None = None,
             head: Head | None = None) -> Generation:
    """Greedy decoding: prefill the prompt (pruning as planned; from `head` if given), then one token
    at a time."""
    with timer.stage("prefill"):
        hidden, generation = prefill(decoder, prompt, plan, timer, head=head)
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
            hidden = decode_step(decoder, hidden, [p + step for p in generation.next_positions], generation)
            logits = lm_head(decoder.norm(hidden))[0, -1].float()
    return generation


def decode_step(decoder, hidden: torch.Tensor, positions: list[int], generation: Generation) -> torch.Tensor:
    """One new token through every layer, at each layer's own RoPE position, attending to the shared
    head (where there is one) and the question's own cache."""
    head = generation.head
    rope = None
    for i, layer in enumerate(decoder.layers):
        if i == 0 or positions[i] != positions[i - 1]:
            rope = decoder.rotary_emb(hidden, torch.tensor([[positions[i]]], device=hidden.device))
        hidden = layer_after_head(layer, hidden, rope, head.kv[i] if i < head.layers else None, generation.cache, i)
    return hidden
