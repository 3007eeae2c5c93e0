"""`vidsparse batch` on clips with few questions (`batch.answered_jobs`): several clips decoded in one
batch, every answer as its clip answered alone gives it, the jobs' order kept, a clip that cannot be
decoded recorded alone, a group within its memory budget, and a clip with a whole decoding batch of
questions answered alone."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vidsparse.batch import answered_jobs, clip_jobs, prefetched
from vidsparse.cli import app
from vidsparse.errors import UserError
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA
from vidsparse.questions import load_questions
from vidsparse.stats import nbytes

OPTIONS = ask_options("stprune", "25%", max_new_tokens=4)


@pytest.fixture(scope="module")
def qa(tiny_checkpoint) -> VideoQA:
    return VideoQA.from_pretrained(str(tiny_checkpoint), dtype="float32", device="cpu")


def jobs(folder):
    """The folder's clips: a.mp4, b.webm, sub/c.mp4 with 4 questions each, broken.mp4 with 1."""
    return list(clip_jobs(load_questions(folder, folder / "qa.jsonl", None)))


def run(qa, folder, monkeypatch, decode_batch: int, hold_bytes: int, order=None, log=None):
    """(each job with its results, the clips' question counts of each `answer_together` call); `log`
    gets "prepared" for each clip prepared and each decoding's question counts, in the order they happen."""
    calls, log = [], [] if log is None else log
    together, prepare = qa.answer_together, qa.prepare_questions

    def spy(asked, *args, **kwargs):
        calls.append([len(questions) for _, questions in asked])
        log.append(calls[-1])
        return together(asked, *args, **kwargs)

    def preparing(video, *args, **kwargs):
        log.append("prepared")
        return prepare(video, *args, **kwargs)

    monkeypatch.setattr(qa, "answer_together", spy)
    monkeypatch.setattr(qa, "prepare_questions", preparing)
    chosen = jobs(folder) if order is None else [jobs(folder)[i] for i in order]
    answered = [(job, list(results)) for job, results in answered_jobs(  # each consumed before the next job
        qa, prefetched(iter(chosen), OPTIONS), OPTIONS, decode_batch, hold_bytes)]
    monkeypatch.undo()
    return answered, calls


def test_clips_with_few_questions_decode_together_as_each_answered_alone(qa, folder, monkeypatch):
    answered, calls = run(qa, folder, monkeypatch, decode_batch=16, hold_bytes=2**30)
    assert calls == [[4, 4, 4]]  # the three clips that can be decoded: one batch
    assert [job.path for job, _ in answered] == [job.path for job in jobs(folder)]
    for job, results in answered:
        questions = [q.question for q in job.questions]
        if job.path.name == "broken.mp4":
            assert len(results) == 1 and isinstance(results[0], UserError) and "not a video" in str(results[0])
            continue
        alone = list(qa.answer_clip(job.path, questions, OPTIONS))
        for got, want in zip(results, alone, strict=True):
            assert got.question == want.question
            assert got.answer == want.answer and got.token_ids == want.token_ids
            torch.testing.assert_close(got.first_logits, want.first_logits, atol=1e-4, rtol=1e-4)
            assert got.kept_tokens() == want.kept_tokens()
            assert got.shared.questions == want.shared.questions == len(questions)


def test_a_group_holds_what_fits_in_its_budget_and_its_decoding_batch(qa, folder, monkeypatch):
    one_clip = nbytes(qa.prepare_questions(jobs(folder)[0].path, ["what moves ?"], OPTIONS)[0])
    _, calls = run(qa, folder, monkeypatch, decode_batch=16, hold_bytes=int(2.5 * one_clip))
    assert calls == [[4, 4], [4]]  # two fit, the third waits for the next group
    _, calls = run(qa, folder, monkeypatch, decode_batch=16, hold_bytes=0)
    assert calls == [[4], [4], [4]]
    _, calls = run(qa, folder, monkeypatch, decode_batch=9, hold_bytes=2**30)
    assert calls == [[4, 4], [4]]  # 12 questions would not fit one decoding batch of 9


def test_a_clip_with_a_whole_decoding_batch_of_questions_is_answered_alone(qa, folder, monkeypatch):
    answered, calls = run(qa, folder, monkeypatch, decode_batch=4, hold_bytes=2**30)
    assert calls == []  # every good clip has 4 questions: each answered alone, 4 at a time
    assert [len(results) for _, results in answered] == [len(job.questions) for job in jobs(folder)]
    assert all(not isinstance(r, Exception) for job, results in answered if job.path.name != "broken.mp4"
               for r in results)


def test_batch_group_mb_on_the_command_line(folder, tmp_path, tiny_checkpoint):
    """The same records with --group-mb 0 (each clip alone) and the default (together); refused with --ray."""
    def records(extra: list[str]) -> list[dict]:
        out = tmp_path / f"r{len(extra)}.jsonl"
        result = CliRunner().invoke(app, ["batch", str(folder), "--questions", str(folder / "qa.jsonl"), "--out",
                                          str(out), "--model", str(tiny_checkpoint), "--method", "stprune",
                                          "--budget", "25%", "--max-new-tokens", "4", "--dtype", "float32", *extra])
        assert result.exit_code == 1  # broken.mp4's question failed
        return [json.loads(line) for line in out.read_text().splitlines()[1:]]

    alone, together = records(["--group-mb", "0"]), records([])
    keys = ("id", "answer", "error", "pruning")
    assert [{k: r.get(k) for k in keys} for r in together] == [{k: r.get(k) for k in keys} for r in alone]
    refused = CliRunner().invoke(app, ["batch", str(folder), "--questions", str(folder / "qa.jsonl"), "--out",
                                       str(tmp_path / "x.jsonl"), "--group-mb", "8", "--ray"])
    assert refused.exit_code == 2 and "--group-mb" in refused.stderr


def test_a_full_group_or_a_failed_clip_is_answered_at_once_in_the_jobs_order(qa, folder, monkeypatch):
    """Nothing waits longer than it must: with no budget each clip is decoded before the next is prepared,
    and a clip that cannot be decoded is recorded after the clips before it, which are answered first."""
    log = []
    run(qa, folder, monkeypatch, decode_batch=16, hold_bytes=0, log=log)
    assert log == ["prepared", [4]] * 3
    log = []
    answered, _ = run(qa, folder, monkeypatch, decode_batch=16, hold_bytes=2**30, order=[0, 3, 1, 2], log=log)
    assert log == ["prepared", [4], "prepared", "prepared", [4, 4]]  # broken.mp4 (second) is not prepared
    assert all(r.__traceback__ is None for r in answered[1][1])  # its frames are not held
    for decode_batch in (8, 10):  # full at 8 questions: decoded at once; at 10, known before the third clip
        log = []
        run(qa, folder, monkeypatch, decode_batch=decode_batch, hold_bytes=2**30, log=log)
        assert log == ["prepared", "prepared", [4, 4], "prepared", [4]], decode_batch
    assert [job.path.name for job, _ in answered] == ["a.mp4", "broken.mp4", "b.webm", "c.mp4"]
    assert isinstance(answered[1][1][0], UserError) and not any(isinstance(r, Exception) for r in answered[0][1])


@pytest.mark.parametrize("fault", ["raised", "returned"])
def test_a_failing_group_answers_each_clip_alone(qa, folder, monkeypatch, fault):
    """A fault in a group's batch (raised, or returned as every question's error, as a failed decoding
    step is) fails only the clip that fails alone; the others are answered again, alone."""
    together = qa.answer_together

    def only_one_clip(asked, *args, **kwargs):
        if len(asked) > 1 or asked[0][0].video.total_frames == 24:  # b.webm (a: 20 frames, c: 28)
            if fault == "raised":
                raise RuntimeError("a fault in the batch")
            return [[RuntimeError("a fault in the batch")] * len(questions) for _, questions in asked]
        return together(asked, *args, **kwargs)

    monkeypatch.setattr(qa, "answer_together", only_one_clip)
    answered = {job.path.name: list(results) for job, results in answered_jobs(
        qa, prefetched(iter(jobs(folder)[:3]), OPTIONS), OPTIONS, 16, 2**30)}
    assert all(isinstance(r, RuntimeError) for r in answered["b.webm"])  # its own fault, its own questions
    assert all(r.__traceback__ is None for r in answered["b.webm"])  # whose frames would hold the group
    assert [r.answer for r in answered["a.mp4"]] == [r.answer for r in qa.answer_clip(
        jobs(folder)[0].path, [q.question for q in jobs(folder)[0].questions], OPTIONS)]
    assert not any(isinstance(r, Exception) for r in answered["c.mp4"])


def test_a_bad_line_after_a_group_comes_after_its_answers(qa, folder):
    def then_a_bad_line():
        yield from prefetched(iter(jobs(folder)[:2]), OPTIONS)
        raise UserError("qa.jsonl line 9: not JSON")

    answered = []
    with pytest.raises(UserError, match="line 9"):
        for job, results in answered_jobs(qa, then_a_bad_line(), OPTIONS, 16, 2**30):
            answered.append((job.path.name, len(list(results))))
    assert answered == [("a.mp4", 4), ("b.webm", 4)]
