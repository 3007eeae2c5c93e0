"""The pruning engine against independent slow references, and each method's contract."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.reference import masked_logits
from tests.references.test_peers import dycoke_keys_reference
from vidsparse.decoding import ClipQuestions, DecodeState, generate
from vidsparse.engine import prefill, prefill_head
from vidsparse.layers import rotary, run_layers
from vidsparse.models.loading import load_model
from vidsparse.pipeline import clip_shape_of
from vidsparse.pruning import METHODS, make_plan
from vidsparse.pruning.base import Method
from vidsparse.stage import attention_rows, row_queries
from vidsparse.stats import StageTimer
from vidsparse.video import decode_video

QUESTION = "what color is the square ?"


# Every family: VideoLLaVA (GQA and not), LLaVA-OneVision (a separator after the video), Qwen2.5-VL
# (3-D M-RoPE, a token per two frames; at the file's rate, 4 frames a second, and at 0.25, where the
# video's time positions run past the text's start).
CHECKPOINTS = [("tiny_checkpoint", None), ("tiny_checkpoint_mha", None), ("tiny_onevision", None),
               ("tiny_qwen", None), ("tiny_qwen", 0.25)]


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=lambda p: p[0] + (f"@{p[1]}fps" if p[1] else ""))
def checkpoint(request) -> tuple[str, float | None]:
    return request.param


@pytest.fixture(scope="module")
def setup(checkpoint, request, clips):
    """(sdpa model, eager reference model, prompt) for one tiny checkpoint."""
    name, fps = checkpoint
    path = str(request.getfixturevalue(name))
    model = load_model(path)
    eager = model.model_class.from_pretrained(path, attn_implementation="eager").eval()
    with torch.inference_mode():
        prompt = ask_about(model, clips, fps)(QUESTION)
    return model, eager, prompt


def ask_about(model, clips, fps: float | None = None):
    """The prompt of any question about the test clip, built as the family builds it (its HF positions);
    `fps` stands for the file's sampled rate."""
    video = decode_video(clips["h264"], 8)
    clip = clip_shape_of(video) if fps is None else replace(clip_shape_of(video), fps=fps)
    features = model.video_features(model.preprocess(video.frames), saliency=True)
    return lambda question: model.embed(model.prompt_ids(question, clip), features, clip)


@pytest.fixture(scope="module")
def reask(setup, checkpoint, clips):
    model, _, prompt = setup
    with torch.inference_mode():
        asker = ask_about(model, clips, checkpoint[1])

    def other(question: str):
        with torch.inference_mode():
            asked = asker(question)
        assert torch.equal(asked.embeds[:, : prompt.head_length], prompt.embeds[:, : prompt.head_length])
        return asked

    return other


def positions_of(prompt) -> torch.Tensor:
    """The prompt's RoPE positions as an HF forward takes them: (1, n), or (3, 1, n) for M-RoPE."""
    return prompt.rope_positions[0] if prompt.rope_positions.shape[0] == 1 else prompt.rope_positions


def skip_compact(model, positions):
    if positions == "compact" and model.position_dims > 1:
        pytest.skip("compact renumbers 1-D positions; an M-RoPE family refuses it (test_families)")


def run(model, prompt, plan, max_new_tokens=6, eos=frozenset()):
    return generate(model.decoder, model.lm_head, prompt, max_new_tokens, set(eos), StageTimer(model.device), plan)


class Replay(Method):
    """Chooses what an earlier run chose, stage by stage, reading nothing: the no-cache recomputation
    below applies a run's own selections again without asking its method."""

    def __init__(self, selections):
        self.selections = selections

    def select(self, stage):
        return self.selections[stage.index]


# Each method that chooses keys while decoding, its slow reference (given the budget).
DECODING_REFERENCES = {"dycoke": dycoke_keys_reference}


def decoding_reference(plan, prompt, block, **settings):
    """The masked reference's decoding-time choice for `plan` over the visual `block` the prefill left
    (None if it makes none)."""
    if plan.decoding_layer is None or plan.budget >= block.size:
        return None
    frames = prompt.visual.frame[block.origin].tolist()
    return plan.decoding_layer, DECODING_REFERENCES[plan.name](plan.budget, frames, plan.min_per_frame, **settings)


def replay_logits(model, prompt, plan, selections, extra_tokens):
    """No-cache recomputation: the whole pruned prefill again on prompt + generated tokens, read as more
    question text. None where generated tokens do not sit where more text would: Qwen2.5-VL at a low
    sampling rate decodes after the video's time positions, past the text's (the masked eager
    reference, which takes every position as given, still checks those), and where generated tokens
    chose keys while decoding (a prompt's rows see every key)."""
    text_rows = prompt.embeds.shape[1] - prompt.head_length
    if extra_tokens and int(prompt.rope_positions.max()) + 1 != prompt.text_start + text_rows:
        return None
    if extra_tokens and plan.decoding_layer is not None:
        return None
    with torch.inference_mode():
        extra = model.decoder.embed_tokens(torch.tensor([extra_tokens], dtype=torch.long))
        rope = prompt.rope_positions
        after = int(rope.max()) + 1 + torch.arange(len(extra_tokens))
        longer = replace(prompt, embeds=torch.cat([prompt.embeds, extra], 1), suffix_words=[],
                         rope_positions=torch.cat([rope, after.expand(rope.shape[0], 1, -1)], -1))
        _, _, hidden = prefill(model.decoder, longer, replace(plan, name="replay", method=Replay(selections)),
                               StageTimer(model.device))
        return model.lm_head(model.decoder.norm(hidden[:, -1]))[0].float()


CASES = [(m, None) for m in METHODS if m != "none"] + [("sparsevlm", (0, 1, 2)), ("fastv", (0, 2))]


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("method, prune_after", CASES)
def test_cached_decode_equals_recomputation_and_masked_reference(setup, method, prune_after, positions):
    model, eager, prompt = setup
    skip_compact(model, positions)
    plan = make_plan(method, 20, 4, prune_after=prune_after, positions=positions, seed=3)
    decoder = model.decoder
    with torch.inference_mode():
        prefilled, cache, hidden = prefill(decoder, prompt, plan, StageTimer(model.device))
        cached = model.lm_head(decoder.norm(hidden[:, -1]))[0].float()
    selections = [record.selection for record in prefilled.stages]
    stages = [(record.layer, record.selection) for record in prefilled.stages]
    start, count = int(prompt.visual.positions[0]), len(prompt.visual)
    decoding = decoding_reference(plan, prompt, prefilled.block)
    tokens: list[int] = []
    state = None
    for _ in range(6):
        recomputed = replay_logits(model, prompt, plan, selections, tokens)
        with torch.no_grad():
            masked = masked_logits(eager, prompt.embeds, start, count, stages, positions, tokens,
                                   prompt.rope_positions[:, 0], decoding=decoding)
        if recomputed is not None:
            torch.testing.assert_close(recomputed, masked, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cached, masked, atol=1e-4, rtol=1e-4)
        tokens.append(int(cached.argmax()))
        with torch.inference_mode():  # one cached decode step, as generate() takes it
            state = state or DecodeState(decoder, [ClipQuestions(plan, [prefilled], [cache], cached[None], 6)])
            cached = model.lm_head(decoder.norm(state.step(torch.tensor([tokens[-1]]))[:, -1]))[0].float()
    assert run(model, prompt, make_plan(method, 20, 4, prune_after=prune_after, positions=positions, seed=3)
               ).decoded.token_ids == tokens


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("extra_budget", [0, 5])
def test_no_pruning_when_budget_covers_every_token(setup, method, extra_budget):
    model, eager, prompt = setup
    plan = make_plan(method, len(prompt.visual) + extra_budget, 4)
    generation = run(model, prompt, plan, max_new_tokens=1)
    with torch.no_grad():
        expected = eager(inputs_embeds=prompt.embeds, position_ids=positions_of(prompt)).logits[0, -1]
    torch.testing.assert_close(generation.first_logits, expected, atol=1e-4, rtol=1e-4)
    assert generation.prefilled.visual_per_layer == [len(prompt.visual)] * 4


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_exact_budget_and_text_never_removed(setup, method):
    model, _, prompt = setup
    n = len(prompt.visual)
    n_text = prompt.embeds.shape[1] - n
    for budget in (1, 7, 64, 194, n - 1, n, n + 5):
        plan = make_plan(method, budget, 4)
        generation = run(model, prompt, plan, max_new_tokens=2)  # one token fed back (the first step)
        prefilled = generation.prefilled
        last_stage = max((record.layer for record in prefilled.stages), default=-1)  # B >= n: no stage runs
        after = prefilled.visual_per_layer[last_stage + 1 :]
        if plan.decoding_layer is None:
            assert after and all(v == min(budget, n) for v in after), (budget, prefilled.visual_per_layer)
            assert generation.decoded.visual_while_decoding is None
        else:  # B is what decoding sees: the first step always chooses (no step before it)
            assert after and all(v == after[0] >= min(budget, n) for v in after), (budget, prefilled.visual_per_layer)
            assert generation.decoded.visual_while_decoding == min(budget, n), budget
        texts = [t - v for t, v in zip(prefilled.tokens_per_layer, prefilled.visual_per_layer, strict=True)]
        assert texts == [n_text] * 4
        steps = generation.decoded.steps
        assert prefilled.kv_lengths(steps)[-1] == n_text + after[-1] + steps  # the cache: what the prefill left


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_attention_rows_equal_eager_output_attentions(setup, layer):
    model, eager, prompt = setup
    decoder = model.decoder
    n = prompt.embeds.shape[1]
    rows = torch.tensor([n - 1, n - 4, 10, 3])
    with torch.inference_mode():
        from transformers import DynamicCache

        cache = DynamicCache(config=decoder.config)
        positions = prompt.rope_positions
        cos_sin = rotary(decoder, prompt.embeds, positions)
        layer_input = run_layers(decoder, prompt.embeds, positions, cos_sin, cache, range(layer))
        run_layers(decoder, layer_input, positions, cos_sin, cache, range(layer, layer + 1))
        keys = cache.layers[layer].keys
        cos, sin = cos_sin
        # The keys in two blocks, as a question after a clip's shared head passes them.
        queries = row_queries(decoder.layers[layer], layer_input[:, rows], (cos[:, rows], sin[:, rows]))
        ours = attention_rows(decoder.layers[layer], queries, rows, [keys[:, :, :30], keys[:, :, 30:]])
    with torch.no_grad():
        expected = eager(inputs_embeds=prompt.embeds, position_ids=positions_of(prompt),
                         output_attentions=True).attentions[layer][0].mean(0)[rows]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(ours[:, n - 3 :][1:2] == 0)  # row n-4 sees no future key


@pytest.mark.parametrize("method, prune_after", [("sparsevlm", (0, 1, 2)), ("pdrop", None), ("fastv", (0, 2)),
                                                 ("dycoke-prefill", None), ("stprune", None)])
def test_each_stage_chooses_from_the_eager_attention_of_its_query_rows(setup, method, prune_after):
    """At every question-guided stage the attention a method chooses from equals eager
    `output_attentions` of the masked reference at that layer: the rows the method asked for, counted
    from the first text row after the video (after OneVision's newline), over the visual tokens left
    (in their block order); and every stage prunes."""
    model, eager, prompt = setup
    plan = make_plan(method, 12, 4, prune_after=prune_after, seed=3)
    seen = []
    choose = plan.method.select
    plan.method.select = lambda stage: (seen.append(stage), choose(stage))[1]
    with torch.inference_mode():
        prefilled, _, _ = prefill(model.decoder, prompt, plan, StageTimer(model.device))
    stages = [(record.layer, record.selection) for record in prefilled.stages]
    start, count = int(prompt.visual.positions[0]), len(prompt.visual)
    captured = {}
    with torch.no_grad():
        masked_logits(eager, prompt.embeds, start, count, stages, "keep", [], prompt.rope_positions[:, 0], captured)
    separators = prompt.head_length - (start + count)
    guided = [stage for stage in seen if stage.attention is not None]
    assert guided and all(b.hidden.shape[0] < a.hidden.shape[0] for a, b in zip(seen, seen[1:], strict=False))
    assert prefilled.visual_per_layer[-1] == 12
    for stage in guided:
        probs, current, after_visual = captured[stage.layer]
        asked = plan.method.query_rows(prompt.embeds.shape[1] - prompt.head_length, stage.facts)
        rows = after_visual + separators + torch.tensor(list(asked))
        torch.testing.assert_close(stage.attention.float(), probs[rows][:, current], atol=1e-5, rtol=1e-4)


def decoded_with_steps(model, prompt, plan):
    """A 6-token generation, and every decoding step's input and choice (a method's own call, recorded)."""
    steps = []
    choose = plan.method.select_while_decoding
    plan.method.select_while_decoding = lambda step: (steps.append((step, choose(step))), steps[-1][1])[1]
    return run(model, prompt, plan, max_new_tokens=6), steps


def check_each_decoding_step(model, eager, prompt, budget: int, min_per_frame: int = 0) -> list[bool]:
    """DyCoke's choice while decoding, step by step, against the masked reference with its slow rule
    (at the threshold the method runs with): the attention each step reads is eager
    `output_attentions` of its new token's row over the visual tokens the prefill left (every earlier
    token's own choice applied), and each step's keys are the reference's. Returns, for each step
    after the first, whether it chose (rather than saw every key)."""
    from vidsparse.pruning import dycoke

    plan = make_plan("dycoke", budget, len(model.decoder.layers), min_per_frame=min_per_frame)
    generation, steps = decoded_with_steps(model, prompt, plan)
    prefilled = generation.prefilled
    assert len(steps) == generation.decoded.steps == 5
    reference, seen = decoding_reference(plan, prompt, prefilled.block, still=dycoke.STILL_ATTENTION), []
    recording = (reference[0], lambda attention, previous: (seen.append((attention, reference[1](attention, previous))),
                                                           seen[-1][1])[1])
    start, count = int(prompt.visual.positions[0]), len(prompt.visual)
    with torch.no_grad():
        masked = masked_logits(eager, prompt.embeds, start, count, [(r.layer, r.selection) for r in prefilled.stages],
                               "keep", generation.decoded.token_ids[:-1], prompt.rope_positions[:, 0],
                               decoding=recording)
    assert len(seen) == 5
    for (step, (keys, _)), (attention, expected) in zip(steps, seen, strict=True):
        torch.testing.assert_close(step.attention[0], attention, atol=1e-5, rtol=1e-4)
        assert torch.equal(keys[0].cpu(), expected)
    assert int(steps[0][1][0][0].sum()) == budget  # the first step always chooses B
    assert int(masked.argmax()) == generation.decoded.token_ids[-1]  # the last token, from those choices
    return [not bool(keys[0].all()) for _, (keys, _) in steps[1:]]


@pytest.mark.parametrize("budget, min_per_frame", [(5, 0), (30, 0), (16, 2)])
def test_each_decoding_step_chooses_from_the_eager_attention_of_its_new_token(setup, budget, min_per_frame):
    """On every family's random model (whose later steps' attention is alike: every key seen)."""
    model, eager, prompt = setup
    check_each_decoding_step(model, eager, prompt, budget, min_per_frame)


@pytest.mark.parametrize("still", [0.9, 0.5])
def test_later_decoding_steps_choose_on_the_trained_model(clips, monkeypatch, still):
    """On the shipped demo model, whose attention moves from one decoded token to the next: at the
    official 0.9 the later steps choose too, and at 0.5 some choose and some see every key (so the
    memory of the step before decides)."""
    from vidsparse.models.loading import find_checkpoint
    from vidsparse.pruning import dycoke

    monkeypatch.setattr(dycoke, "STILL_ATTENTION", still)
    model = load_model("shapes-demo", dtype="float32", device="cpu")
    eager = model.model_class.from_pretrained(str(find_checkpoint("shapes-demo").location),
                                              attn_implementation="eager").eval()
    with torch.inference_mode():
        prompt = ask_about(model, clips)(QUESTION)
    chose = check_each_decoding_step(model, eager, prompt, 7)
    assert all(chose) if still == 0.9 else any(chose) and not all(chose)


@pytest.mark.parametrize("method", ["random", "fastv", "sparsevlm", "pdrop"])
def test_min_per_frame_keeps_every_moment(setup, method):
    model, _, prompt = setup
    plan = make_plan(method, 16, 4, min_per_frame=2)
    generation = run(model, prompt, plan, max_new_tokens=1)
    frames = prompt.visual.frame[generation.prefilled.block.origin[~generation.prefilled.block.merged]]
    assert torch.bincount(frames, minlength=int(prompt.visual.frame.max()) + 1).min() >= 2
    assert generation.prefilled.block.size == 16  # and the budget still holds (SparseVLM recycles fewer)


def test_uniform_spreads_the_budget_over_frames(setup):
    model, _, prompt = setup
    generation = run(model, prompt, make_plan("uniform", 20, 4), max_new_tokens=1)
    frames = prompt.visual.frame[generation.prefilled.block.origin]
    spans = int(prompt.visual.frame.max()) + 1  # 8 frames; Qwen2.5-VL's tokens cover 2 frames: 4 spans
    assert torch.bincount(frames, minlength=spans).tolist() == [20 // spans + (i < 20 % spans) for i in range(spans)]
    assert not prompt.visual.is_cls[generation.prefilled.block.origin].any()


def test_random_is_seeded(setup):
    model, _, prompt = setup
    kept = [run(model, prompt, make_plan("random", 20, 4, seed=s), max_new_tokens=1).prefilled.block.origin
            for s in (1, 1, 2)]
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


OTHER_QUESTIONS = ["how many objects are there ?", "which shape moves first ? answer with one word please"]


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("method, prune_after", [(m, None) for m in METHODS] + [("fastv", (0, 2))])
def test_one_head_serves_every_question_of_a_clip(setup, reask, method, prune_after, positions):
    """The head built from one question's prompt, reused by others: each equals the masked eager
    reference with its own selections and its own solo run (logits, kept tokens); the head's keys
    and values are read in place, never copied or changed."""
    model, eager, prompt = setup
    skip_compact(model, positions)
    decoder = model.decoder

    def plan():
        return make_plan(method, 20, 4, prune_after=prune_after, positions=positions, seed=3)

    with torch.inference_mode():
        head = prefill_head(decoder, prompt, plan(), StageTimer(model.device))
        pointers = [(kv.keys.data_ptr(), kv.values.data_ptr()) for kv in head.kv]
        snapshot = [kv.keys.clone() for kv in head.kv]
        start, count = int(prompt.visual.positions[0]), len(prompt.visual)
        for question in OTHER_QUESTIONS:
            other = reask(question)
            shared = generate(decoder, model.lm_head, other, 1, set(), StageTimer(model.device), plan(), head=head)
            solo = generate(decoder, model.lm_head, other, 1, set(), StageTimer(model.device), plan())
            stages = [(record.layer, record.selection) for record in shared.prefilled.stages]
            with torch.no_grad():
                masked = masked_logits(eager, other.embeds, start, count, stages, positions, [],
                                       other.rope_positions[:, 0])
            torch.testing.assert_close(shared.first_logits, masked, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(shared.first_logits, solo.first_logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(shared.prefilled.block.origin, solo.prefilled.block.origin)
            question_rows = other.embeds.shape[1] - head.length
            assert shared.prefilled.own_lengths[: head.layers] == [question_rows] * head.layers
    assert [(kv.keys.data_ptr(), kv.values.data_ptr()) for kv in head.kv] == pointers
    assert all(torch.equal(kv.keys, before) for kv, before in zip(head.kv, snapshot, strict=True))
    assert head.layers == (4 if not METHODS[method].needs_attention else 1 + next(
        layer for layer in plan().stages if layer >= 0))


@pytest.mark.parametrize("method", list(METHODS))
def test_one_method_object_serves_every_question(setup, reask, method):
    """A method keeps what it learns of a question (SparseVLM's raters and ranks) in the value the
    engine hands back, not on itself: one plan answers questions in turn as a fresh plan answers each
    (kept tokens, logits, report), and the method object holds nothing afterwards."""
    model, _, prompt = setup
    shared = make_plan(method, 20, 4, seed=3)
    prompts = [reask(q) for q in [QUESTION, *OTHER_QUESTIONS]]
    for other in [*prompts, prompts[0]]:
        with_shared = run(model, other, shared, max_new_tokens=1)
        fresh_plan = make_plan(method, 20, 4, seed=3)
        fresh = run(model, other, fresh_plan, max_new_tokens=1)
        assert torch.equal(with_shared.prefilled.block.origin, fresh.prefilled.block.origin)
        torch.testing.assert_close(with_shared.first_logits, fresh.first_logits, atol=0, rtol=0)
        facts = with_shared.prefilled.facts, fresh.prefilled.facts
        assert shared.method.report(facts[0]) == fresh_plan.method.report(facts[1])
    assert vars(shared.method) == {}
