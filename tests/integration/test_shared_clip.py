"""A clip's questions answered together (VideoQA.answer_clip, what `batch` runs) against each
question asked alone (`ask`): the same answers, first-token logits and kept tokens, with the clip's
shared work paid once and accounted for honestly."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from vidsparse import pipeline
from vidsparse.datasets import shapes
from vidsparse.engine import prefill_head
from vidsparse.errors import UserError
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA
from vidsparse.pruning import plan_for
from vidsparse.video import decode_video

QUESTIONS = ["what color is the square ?", "how many objects are there ?", "what moves ?",
             "which shape appears first in the video , the circle or the triangle ?"]


@pytest.fixture(scope="module")
def qa_and_video(tiny_checkpoint, clips):
    return VideoQA.from_pretrained(str(tiny_checkpoint)), decode_video(clips["h264"], 8)


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("method", ["none", "uniform", "tome", "fastv", "pdrop", "sparsevlm", "vidcom2", "fastvid",
                                    "dycoke", "stprune"])
def test_questions_of_a_clip_answer_as_if_asked_alone(qa_and_video, method, positions):
    qa, video = qa_and_video
    options = ask_options(method, "20%", None, positions, 0, 0, 8, "auto", 4)
    together = list(qa.answer_clip(video, QUESTIONS, options))
    for question, shared in zip(QUESTIONS, together, strict=True):
        alone = qa.answer(video, question, options)
        assert shared.answer == alone.answer
        torch.testing.assert_close(shared.first_logits, alone.first_logits, atol=1e-4, rtol=1e-4)
        assert shared.kept_tokens() == alone.kept_tokens()
        assert shared.prefill_flops == alone.prefill_flops  # the method's own cost does not change
    records = [r.to_dict() for r in together]
    assert {r["shared"]["questions"] for r in records} == {len(QUESTIONS)}
    clip_flops = records[0]["shared"]["prefill_flops"] + records[0]["flops"]["vision"]
    # Amortised FLOPs add up to each question's own plus the clip's shared work, once.
    assert sum(r["flops"]["amortised"] for r in records) == pytest.approx(
        sum(r["flops"]["prefill_own"] for r in records) + clip_flops, abs=len(records))
    # The shared work is the head's rows through the shared layers: all of them for a method that never
    # reads the question, the layers up to its first question-guided stage otherwise.
    alone = qa.answer(video, QUESTIONS[0], options).to_dict()
    assert alone["shared"]["prefill_flops"] == records[0]["shared"]["prefill_flops"]
    plan = plan_for(options, 4, 8, 136)
    guided = [layer for layer in plan.stages if plan.method.reads_question(layer)]
    shared_layers = guided[0] + 1 if guided else 4
    pruned_before_layer_0 = bool(plan.stages) and plan.stages[0] == -1
    head_rows = 3 + (records[0]["pruning"]["visual_per_stage"][1] if pruned_before_layer_0 else 136)
    assert records[0]["shared"]["prefill_flops"] == shared_layers * paper_layer_flops(head_rows)


def paper_layer_flops(n: int, d: int = 64, kv: int = 32, m: int = 256) -> int:
    """The tiny GQA checkpoint's layer (width 64, 2 of 4 heads for keys/values, MLP 256) on n tokens, by
    the paper's formula with GQA: q and o projections 2nd^2, k and v 2nd x kv, attention 2n^2d, MLP 3ndm."""
    return 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m


@pytest.mark.parametrize("method", ["none", "sparsevlm", "vidcom2", "stprune"])
def test_a_prepared_clip_answers_later_calls_as_if_each_question_were_asked_alone(qa_and_video, method):
    """A server's clip cache: the shared work done once (`prepare_clip`), then questions in separate calls,
    one of them asked twice; each result must be `ask`'s, and the shared work's share shrinks as it is reused."""
    qa, video = qa_and_video
    options = ask_options(method, "20%", None, "keep", 0, 0, 8, "auto", 4)
    clip = qa.prepare_clip(video, "anything at all ?", options)
    asked = 0
    for call in (QUESTIONS[:2], QUESTIONS[1:]):
        asked += len(call)
        clip = clip.asked(len(call))
        for question, reused in zip(call, qa.answer_prepared(clip, call), strict=True):
            alone = qa.answer(video, question, options)
            assert reused.answer == alone.answer
            torch.testing.assert_close(reused.first_logits, alone.first_logits, atol=1e-4, rtol=1e-4)
            assert reused.kept_tokens() == alone.kept_tokens() and reused.prefill_flops == alone.prefill_flops
            assert reused.to_dict()["shared"]["questions"] == asked


@pytest.mark.parametrize("method", ["none", "stprune"])
def test_a_prepared_clip_holds_no_autograd_graph(qa_and_video, method):
    """A checkpoint's weights require gradients; a head built with autograd on kept every layer's
    activations alive with it (a cached clip at the 7B geometry: ~0.5 GB a layer, unaccounted)."""
    qa, video = qa_and_video
    assert any(p.requires_grad for p in qa.model.decoder.parameters())  # as from_pretrained leaves them
    clip = qa.prepare_clip(video, "anything at all ?", ask_options(method, "20%", None, "keep", 0, 0, 8, "auto", 2))
    tensors = [clip.head.hidden, clip.head.positions, *(t for kv in clip.head.kv for t in (kv.keys, kv.values))]
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)


def test_a_bad_question_fails_alone(qa_and_video):
    qa, video = qa_and_video
    options = ask_options("sparsevlm", "20%", None, "keep", 0, 0, 8, "auto", 2)
    results = list(qa.answer_clip(video, ["what moves ?", "  ", "what is <video> ?", "what color ?"], options))
    assert [type(r).__name__ for r in results] == ["AskResult", "UserError", "UserError", "AskResult"]
    assert "empty" in str(results[1]) and "special token" in str(results[2])
    assert results[0].to_dict()["shared"]["questions"] == 2


def test_a_clip_with_only_bad_questions_is_never_decoded(qa_and_video, tmp_path):
    qa, _ = qa_and_video
    options = ask_options("none", "100%", None, "keep", 0, 0, 8, "auto", 2)
    results = list(qa.answer_clip(tmp_path / "missing.mp4", [""], options))
    assert isinstance(results[0], UserError) and "empty" in str(results[0])


def test_questions_decoded_together_each_stop_at_their_own_end():
    """One forward per step for every unfinished question: each still stops at its own EOS, with the
    tokens and cache it would have alone (the shipped model: one-word answers and longer descriptions)."""
    qa = VideoQA.from_pretrained("shapes-demo")
    clip = shapes.render_clip(np.random.default_rng(5))
    questions = ["describe the objects ?", "what color is the circle ?", "how many objects are there ?",
                 "describe the shapes ?", "what shape is the red object ?"]
    options = ask_options("stprune", "25%", None, "keep", 0, 0, 8, "auto", 12)
    alone = [qa.answer(clip.frames, q, options) for q in questions]
    together = list(qa.answer_clip(clip.frames, questions, options, decode_batch=4))
    assert len({r.generated_tokens for r in alone}) > 1, "the questions should stop at different steps"
    for a, t in zip(alone, together, strict=True):
        assert (t.answer, t.generated_tokens, t.kv_cache_bytes) == (a.answer, a.generated_tokens, a.kv_cache_bytes)
        torch.testing.assert_close(t.first_logits, a.first_logits, atol=1e-4, rtol=1e-4)


def dycoke_similarities_at_half(monkeypatch) -> list[float]:
    """DyCoke's threshold moved to 0.5 (where the shipped model's later steps both choose and see every
    key); the list every similarity its choice while decoding computes (against the step before) is
    appended to."""
    from vidsparse.pruning import dycoke

    monkeypatch.setattr(dycoke, "STILL_ATTENTION", 0.5)
    similarities: list[float] = []
    choose = dycoke.DyCoke.select_while_decoding

    def recording(self, step):
        if step.previous is not None:
            similarities.extend(torch.nn.functional.cosine_similarity(step.attention, step.previous, dim=-1).tolist())
        return choose(self, step)

    monkeypatch.setattr(dycoke.DyCoke, "select_while_decoding", recording)
    return similarities


def test_questions_decoded_together_each_choose_their_own_keys_while_decoding(monkeypatch):
    """DyCoke's choice while decoding, for questions decoded together that end at different steps (one
    that ends early sits among ones that go on): each question's tokens, the visual keys they saw, and
    every similarity its choice computed (the memory of its own step before) are those it has alone. The
    threshold is moved to 0.5, where this model's later steps both choose and see every key."""
    similarities = dycoke_similarities_at_half(monkeypatch)
    qa = VideoQA.from_pretrained("shapes-demo")
    clip = shapes.render_clip(np.random.default_rng(5))
    questions = ["what color ?", "describe the objects in the video ?", "what shape is red ?",
                 "describe the shapes in the video ?"]
    options = ask_options("dycoke", "5%", None, "keep", 0, 0, 8, "auto", 12)
    alone = []
    for question in questions:
        alone.append(qa.answer(clip.frames, question, options))
    alone_similarities = sorted(similarities)
    similarities.clear()
    together = list(qa.answer_clip(clip.frames, questions, options, decode_batch=4))
    assert len({r.generated_tokens for r in alone}) > 2, "the questions should stop at different steps"
    assert min(alone_similarities) < 0.5 < max(alone_similarities)
    for a, t in zip(alone, together, strict=True):
        assert (t.answer, t.generated_tokens, t.visual_while_decoding) == (a.answer, a.generated_tokens,
                                                                           a.visual_while_decoding)
    torch.testing.assert_close(sorted(similarities), alone_similarities, atol=1e-5, rtol=1e-5)


def test_a_clips_shared_state_is_released_with_its_last_answer(qa_and_video, monkeypatch):
    """Memory does not grow with the clips: once a clip's last answer is out, nothing holds its head's
    keys/values (the results keep only what they report)."""
    qa, video = qa_and_video
    heads = []

    def spy(*args, **kwargs):
        head = prefill_head(*args, **kwargs)
        heads.append(weakref.ref(head.kv[0].keys))
        return head

    monkeypatch.setattr(pipeline, "prefill_head", spy)
    options = ask_options("sparsevlm", "20%", None, "keep", 0, 0, 8, "auto", 3)
    results = [r for _ in range(2) for r in qa.answer_clip(video, QUESTIONS, options)]
    gc.collect()
    assert len(heads) == 2 and all(ref() is None for ref in heads) and len(results) == 2 * len(QUESTIONS)
