"""Questions about different clips decoded in one batch (`VideoQA.answer_together`, what the server
runs for requests about several clips) against each question asked alone (`ask`): the same answers,
first-token logits and visual keys seen while decoding, whatever each clip's plan, positions, head
length and answer length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsparse import decoding, pipeline
from vidsparse.errors import UserError
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA
from vidsparse.video import decode_video

# (codec, frames, method, positions, answer length): heads of different lengths, shared through
# different numbers of layers (sparsevlm reads the question), compact positions beside kept ones, a
# plan that chooses visual keys while decoding (dycoke), and answers of different lengths.
ASKED = {
    "videollava": [("h264", 8, "none", "keep", 5), ("vp9", 8, "stprune", "compact", 3),
                   ("av1", 8, "sparsevlm", "keep", 6), ("h264", 8, "dycoke", "keep", 4)],
    "onevision": [("h264", 8, "none", "keep", 5), ("vp9", 4, "stprune", "keep", 3), ("av1", 6, "dycoke", "keep", 4)],
    "qwen": [("h264", 8, "fastv", "keep", 5), ("vp9", 4, "none", "keep", 3), ("av1", 6, "stprune", "keep", 4)],
}
QUESTIONS = ["what color is the square ?", "what moves ?", "how many objects are there ?"]


def options_of(method: str, positions: str, frames: int, new_tokens: int):
    return ask_options(method, "20%", None, positions, 0, 0, frames, "auto", new_tokens)


@pytest.mark.parametrize("family", ["videollava", "onevision", "qwen"])
def test_questions_about_several_clips_decode_together_as_if_each_were_asked_alone(
        request, clips, family, monkeypatch):
    checkpoint = {"videollava": "tiny_checkpoint", "onevision": "tiny_onevision", "qwen": "tiny_qwen"}[family]
    qa = VideoQA.from_pretrained(str(request.getfixturevalue(checkpoint)), dtype="float32", device="cpu")
    asked, alone = [], []
    for c, (codec, frames, method, positions, new_tokens) in enumerate(ASKED[family]):
        video = decode_video(clips[codec], frames)
        options = options_of(method, positions, frames, new_tokens)
        questions = QUESTIONS[: 3 - c % 2]  # clips of 3 and 2 questions
        asked.append((qa.prepare_clip(video, questions[0], options).asked(len(questions)), questions))
        alone.append([qa.answer(video, q, options) for q in questions])
    batches, row_batches = [], []
    step = decoding.DecodeState.step
    monkeypatch.setattr(decoding.DecodeState, "step",
                        lambda self, tokens: batches.append(len(tokens)) or step(self, tokens))
    question_rows = pipeline.question_rows
    monkeypatch.setattr(pipeline, "question_rows", lambda decoder, clips: row_batches.append(
        sorted(len(c.prompts) for c in clips)) or question_rows(decoder, clips))
    together = qa.answer_together(asked)
    assert batches[0] == sum(len(questions) for _, questions in asked)  # one batch for every clip's questions
    # The questions' rows through the layers shared with their heads: one batch for the clips whose heads
    # cover the same layers.
    covered: dict[int, list[int]] = {}
    for clip, questions in asked:
        covered.setdefault(clip.head.layers, []).append(len(questions))
    assert sorted(row_batches) == sorted(sorted(counts) for counts in covered.values())
    assert max(map(len, row_batches)) > 1
    heads = {clip.head.kv[0].keys.shape[-2] for clip, _ in asked}
    assert len(heads) > 1  # the clips' heads differ: each row must read its own
    for results, expected in zip(together, alone, strict=True):
        assert len(results) == len(expected)
        for got, want in zip(results, expected, strict=True):
            assert got.answer == want.answer and got.token_ids == want.token_ids
            torch.testing.assert_close(got.first_logits, want.first_logits, atol=1e-4, rtol=1e-4)
            assert got.kept_tokens() == want.kept_tokens()
            assert got.visual_while_decoding == pytest.approx(want.visual_while_decoding)
    if family == "videollava":  # dycoke chose keys while decoding beside clips that do not
        assert together[3][0].visual_while_decoding is not None and together[0][0].visual_while_decoding is None


def test_questions_that_join_a_running_decoding_answer_as_if_each_were_asked_alone(tiny_checkpoint, clips,
                                                                                    monkeypatch):
    """A server's requests join the decoding already running: the first clip's questions decode alone
    for a step, the second clip's join, then after two more steps the last two clips' (dycoke choosing
    keys while decoding, compact positions beside kept ones, answers of different lengths, rows
    leaving as their answers end). Each answer, its first logits and the visual keys its tokens saw
    are those it gets asked alone."""
    qa = VideoQA.from_pretrained(str(tiny_checkpoint), dtype="float32", device="cpu")
    asked, alone = [], []
    for c, (codec, frames, method, positions, new_tokens) in enumerate(ASKED["videollava"]):
        video = decode_video(clips[codec], frames)
        options = options_of(method, positions, frames, new_tokens)
        questions = QUESTIONS[: 3 - c % 2]
        asked.append((qa.prepare_clip(video, questions[0], options).asked(len(questions)), questions))
        alone.append([qa.answer(video, q, options) for q in questions])
    batches = []
    step = decoding.DecodeState.step
    monkeypatch.setattr(decoding.DecodeState, "step",
                        lambda self, tokens: batches.append(len(tokens)) or step(self, tokens))
    results: dict[tuple[int, int], object] = {}

    def joining(first: int, clips_asked: list) -> None:
        answering.join(clips_asked, lambda c, i, result: results.__setitem__((first + c, i), result))

    answering = pipeline.Answering(qa)
    joining(0, asked[:1])
    answering.step()
    joining(1, asked[1:2])
    answering.step()
    answering.step()
    joining(2, asked[2:])
    answering.finish()
    # 3 alone, 2 join them, then the last clips' 5 join as the second clip's 2 end (its answers are 3 tokens)
    assert batches[:4] == [3, 5, 5, 8]
    for c, expected in enumerate(alone):
        for i, want in enumerate(expected):
            got = results[c, i]
            assert got.answer == want.answer and got.token_ids == want.token_ids
            torch.testing.assert_close(got.first_logits, want.first_logits, atol=1e-4, rtol=1e-4)
            assert got.visual_while_decoding == pytest.approx(want.visual_while_decoding)
    assert results[3, 0].visual_while_decoding is not None and results[0, 0].visual_while_decoding is None


def test_a_failed_step_fails_the_questions_in_it_and_keeps_the_answer_that_ended_before_it(tiny_checkpoint, clips,
                                                                                          monkeypatch):
    """The decoding fails (simulated: dropping the ended row from its buffers) at the step where a 2-token
    answer has just ended: that answer is kept, as `ask` gives it, and the 5-token one still decoding gets
    the error."""
    qa = VideoQA.from_pretrained(str(tiny_checkpoint), dtype="float32", device="cpu")
    asked, alone = [], []
    for codec, new_tokens in (("h264", 2), ("vp9", 5)):
        video, options = decode_video(clips[codec], 8), options_of("none", "keep", 8, new_tokens)
        asked.append((qa.prepare_clip(video, "what moves ?", options).asked(1), ["what moves ?"]))
        alone.append(qa.answer(video, "what moves ?", options))
    steps, step = [], decoding.DecodeState.step

    def fails(self, rows):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(decoding.DecodeState, "step", lambda self, tokens: steps.append(len(tokens))
                        or step(self, tokens))
    monkeypatch.setattr(decoding.DecodeState, "keep", fails)
    (short,), (long,) = qa.answer_together(asked)
    assert steps == [2]  # the short answer ended at the second step, before the rows were kept
    assert short.token_ids == alone[0].token_ids and len(short.token_ids) == 2
    assert isinstance(long, RuntimeError) and "simulated" in str(long)


def test_a_hook_and_a_refused_question_keep_each_clip_and_question_in_its_place(tiny_checkpoint, clips):
    """The hook hears (clip, question, token) with the question's place among those asked (a refused
    one before it counts); ending one answer leaves every other as it was."""
    qa = VideoQA.from_pretrained(str(tiny_checkpoint), dtype="float32", device="cpu")
    asked = []
    for codec, method in (("h264", "none"), ("vp9", "stprune")):
        options = options_of(method, "keep", 8, 5)
        asked.append((qa.prepare_clip(decode_video(clips[codec], 8), "what ?", options).asked(2),
                      ["  ", "what moves ?", "what color is the square ?"]))
    full = qa.answer_together(asked)
    heard: dict[tuple[int, int], list[int]] = {}

    def hook(clip: int, question: int, token: int) -> bool:
        heard.setdefault((clip, question), []).append(token)
        return not (clip == 1 and question == 1 and len(heard[clip, question]) == 2)

    ended = qa.answer_together(asked, on_token=hook)
    for results in (full, ended):
        assert all(isinstance(results[c][0], UserError) and "empty" in str(results[c][0]) for c in (0, 1))
    assert set(heard) == {(0, 1), (0, 2), (1, 1), (1, 2)}
    for c, q in heard:
        if (c, q) == (1, 1):
            assert ended[c][q].token_ids == heard[c, q] == full[c][q].token_ids[:2]
            assert len(full[c][q].token_ids) > 2
        else:
            assert ended[c][q].token_ids == heard[c, q] == full[c][q].token_ids


def test_a_clip_choosing_keys_while_decoding_keeps_its_own_memory_beside_other_clips(monkeypatch):
    """DyCoke's choice while decoding (the threshold at 0.5, where the shipped model's later steps both
    choose and see every key) for a clip decoded after another clip's questions, both with questions
    that end at different steps: as rows leave the batch, each question's tokens, the keys they saw and
    every similarity its choice computed (against its own step before) are those it has alone."""
    from tests.integration.test_shared_clip import dycoke_similarities_at_half
    from vidsparse.datasets import shapes
    from vidsparse.video import DecodedVideo

    similarities = dycoke_similarities_at_half(monkeypatch)
    qa = VideoQA.from_pretrained("shapes-demo")
    first = ([shapes.render_clip(np.random.default_rng(6)).frames, options_of("stprune", "keep", 8, 12),
              ["describe the objects in the video ?", "what color ?", "describe the shapes ?"]])
    second = ([shapes.render_clip(np.random.default_rng(5)).frames, options_of("dycoke", "keep", 8, 12),
               ["what color ?", "describe the objects in the video ?", "what shape is red ?",
                "describe the shapes in the video ?"]])
    alone = [[qa.answer(frames, q, options) for q in questions] for frames, options, questions in (first, second)]
    alone_similarities = sorted(similarities)
    similarities.clear()
    asked = [(qa.prepare_clip(DecodedVideo(frames, list(range(8)), 0.0, 0.0, "given", 8), questions[0], options
                              ).asked(len(questions)), questions) for frames, options, questions in (first, second)]
    together = qa.answer_together(asked)
    assert all(len({r.generated_tokens for r in results}) > 1 for results in alone), "answers of different lengths"
    assert min(alone_similarities) < 0.5 < max(alone_similarities)
    for got, want in zip(sum(together, []), sum(alone, []), strict=True):
        assert (got.answer, got.generated_tokens, got.visual_while_decoding) == (want.answer, want.generated_tokens,
                                                                                 want.visual_while_decoding)
    torch.testing.assert_close(sorted(similarities), alone_similarities, atol=1e-5, rtol=1e-5)


def test_a_clip_whose_every_question_is_refused_leaves_the_others_as_they_were(tiny_checkpoint, clips):
    qa = VideoQA.from_pretrained(str(tiny_checkpoint), dtype="float32", device="cpu")
    options = options_of("none", "keep", 8, 4)
    asked = [(qa.prepare_clip(decode_video(clips[codec], 8), "what ?", options).asked(1), questions)
             for codec, questions in (("h264", ["  ", "what is <video> ?"]), ("vp9", ["what moves ?"]))]
    refused, (answered,) = qa.answer_together(asked)
    assert [type(r) for r in refused] == [UserError, UserError]
    assert answered.answer == qa.answer(decode_video(clips["vp9"], 8), "what moves ?", options).answer
