"""`vidsparse batch`: answer every question of a folder, resumably, one video decoded once.

The model is loaded once; the questions are read one at a time and grouped by video (within a
window of the file); the next video is decoded on a background thread while the current one is
answered, and clips with few questions are decoded several together (`answered_jobs`). Each answer
(or error) is appended to the results file as soon as it exists, so a killed run loses at most the
questions in flight (a group's, at most one decoding batch, and the next clip's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidsparse.answer import AskResult
from vidsparse.errors import UserError
from vidsparse.metrics import Tally, is_correct
from vidsparse.options import DECODE_BATCH, GROUP_MB, AskOptions
from vidsparse.pipeline import PreparedClip, VideoQA
from vidsparse.questions import Question, relative_name
from vidsparse.results import ResultsFile, question_key
from vidsparse.stats import HeldBytes, PeakMemory
from vidsparse.video import DecodedVideo, decode_clip


def batch_settings(model: str, dtype: str, device: str, options: AskOptions) -> dict[str, Any]:
    """What decides the answers of a batch (and so what a results file must not mix): the checkpoint
    and its weights, the dtype it runs in (resolved: `auto` differs between CPU and GPU) and every
    answer option."""
    from vidsparse.models.loading import find_checkpoint, resolve_device, resolve_dtype, weights_fingerprint

    source = find_checkpoint(model)
    resolved = resolve_dtype(dtype, resolve_device(device))
    return {"model": source.identity, "weights": weights_fingerprint(source),
            "dtype": str(resolved).removeprefix("torch."), **options.settings()}


def source_settings(videos: Path, question: str | None) -> dict[str, Any]:
    """Which videos, and the one question asked of each (results-file settings too): without them a
    second folder, or another --question about the same clips, would be taken for answers already
    given (the ids of --question are the videos' names). A questions file is not named: each recorded
    id is compared with the question it now names (`unanswered`), so the file may move, or gain
    questions, and still resume."""
    return {"videos": str(videos.resolve()), "question": question}


# Questions read ahead to gather a clip's questions into one job (a clip's questions share its decoding,
# vision tower and prompt head): a file ordered by anything but the video still pays for most clips once,
# and memory stays that of WINDOW questions however long the file is.
WINDOW = 4096


@dataclass
class ClipJob:
    """A clip and the questions about it answered together."""

    path: Path
    questions: list[Question]
    attempts: int = 0  # `batch --ray`: how many workers were given it


def unanswered(questions: Iterable[Question], root: Path, results: ResultsFile, tally: Tally,
               on_progress: Callable[[], None]) -> Iterator[Question]:
    """The questions not yet in `results`; each recorded one is counted in `tally` and must still mean
    the same question: an edited questions file that reuses an id would otherwise be skipped as
    answered, and its old answer reported as the new one's. An error record retried (`retry_errors`)
    may have changed: correcting the question is how its cause is fixed, and the new record
    supersedes the error."""
    mark = time.perf_counter()  # reading the next question counts to the skipping if it is skipped
    for q in questions:
        if not results.is_done(q.id):
            yield q
            mark = time.perf_counter()
            continue
        entry = results.index[q.id]
        now = question_record(q, root)
        if entry.question != question_key(now):
            _refuse_changed(q.id, results.record(entry), now, results)
        tally.count(entry.correct, entry.failed)
        on_progress()
        checked = time.perf_counter()
        tally.skipping_seconds += checked - mark
        mark = checked


def _refuse_changed(qid: str, record: dict[str, Any], now: dict[str, Any], results: ResultsFile) -> None:
    differ = [key for key in ("video", "question", "reference") if key in record and record[key] != now[key]]
    if differ:
        key = differ[0]
        fix = ("it was recorded with an error: --retry-errors asks it again as it is now" if record.get("error")
               else "restore them, or choose a new --out")
        raise UserError(f"{results.path}: id {qid!r} was recorded with {key} {record[key]!r}, the questions "
                        f"now give {now[key]!r}; the questions changed since that run: {fix}")


def clip_jobs(questions: Iterable[Question], window: int = WINDOW) -> Iterator[ClipJob]:
    """The questions grouped by video, clips in the order they first appear; a clip's questions are
    gathered from the next `window` questions read."""
    pending: dict[Path, list[Question]] = {}
    held = 0
    for q in questions:
        pending.setdefault(q.video, []).append(q)
        held += 1
        if held >= window:
            path = next(iter(pending))
            group = pending.pop(path)
            held -= len(group)
            yield ClipJob(path, group)
    for path, group in pending.items():
        yield ClipJob(path, group)


def prefetched(jobs: Iterator[ClipJob], options: AskOptions) -> Iterator[tuple[ClipJob, DecodedVideo | UserError]]:
    """Each job with its decoded video, the next one decoding on a thread while the caller works. A
    mistake found reading the next job (a bad line of the questions file) is raised once the current
    job is answered."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:

        def submit(job: ClipJob | None) -> tuple[ClipJob, Future] | None:
            return None if job is None else (job, pool.submit(decode_clip, job.path, options))

        current = submit(next(jobs, None))
        while current is not None:
            job, decoding = current
            try:
                following, mistake = submit(next(jobs, None)), None
            except UserError as e:
                following, mistake = None, e
            try:
                yield job, decoding.result()
            except UserError as e:
                yield job, e
            if mistake is not None:
                raise mistake
            current = following


def question_record(q: Question, root: Path) -> dict[str, Any]:
    return {"id": q.id, "video": relative_name(q.video, root), "question": q.question, "type": q.type,
            "reference": q.answer}


def answer_fields(result: AskResult | Exception, path: Path) -> dict[str, Any]:
    """What a record holds about its answer: the answer and its statistics, or the error (JSON only,
    so that a worker on another machine can send it)."""
    if isinstance(result, UserError):
        return {"error": str(result)}
    if isinstance(result, Exception):
        return {"error": f"unexpected {type(result).__name__}: {result}"}
    stats = result.to_dict()
    stats["clip"] = stats.pop("video") | {"path": str(path)}
    return stats


def answer_record(q: Question, root: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """One line of the results file: the question, then its answer fields, then whether it is correct
    (an error record has `answer` and `correct` too, both null, so that every record has the same keys
    to read)."""
    if "error" in fields:
        return question_record(q, root) | {"answer": None, "correct": None} | fields
    record = question_record(q, root) | fields
    record["correct"] = None if q.answer is None else is_correct(fields["answer"], q.answer)
    return record


def clip_answers(qa: VideoQA, video: DecodedVideo | UserError, questions: list[str], options: AskOptions,
                 decode_batch: int) -> Iterator[AskResult | Exception]:
    """One result or error per question about a clip; what stops the whole clip (its video, its
    shared work) becomes the error of each question not answered yet."""
    count = 0
    try:
        if isinstance(video, UserError):
            raise video
        for result in qa.answer_clip(video, questions, options, decode_batch):
            count += 1
            yield result
    except Exception as e:  # noqa: BLE001 - one clip must not end the run; the error is recorded
        yield from [e] * (len(questions) - count)


def write_answers(job: ClipJob, answers: Iterable[dict[str, Any]], root: Path, results: ResultsFile, tally: Tally,
                  on_progress: Callable[[], None], extra: dict[str, Any] | None = None) -> None:
    """Append a record for each of a clip's questions (with `extra` fields), counted as it is written."""
    for q, fields in zip(job.questions, answers, strict=True):
        record = answer_record(q, root, fields) | (extra or {})
        results.append(record)
        tally.count(record["correct"], "error" in record, new=True)
        on_progress()


class _Group:
    """Prepared clips waiting to be decoded together, within a decoding batch of questions and a byte
    budget (the storages clips share counted once)."""

    def __init__(self, qa: VideoQA, decode_batch: int, hold_bytes: int):
        self.qa, self.decode_batch, self.hold_bytes = qa, decode_batch, hold_bytes
        self.memory = PeakMemory(qa.model.device)  # one high-water mark for the group's records
        self.clips: list[tuple[ClipJob, PreparedClip]] = []
        self.held, self.asked = HeldBytes(), 0

    def has_room_for(self, questions: int) -> bool:
        return not self.clips or self.asked + questions <= self.decode_batch

    def fits(self, clip: PreparedClip, questions: int) -> bool:
        return not self.clips or (self.has_room_for(questions) and self.held.fits(clip, self.hold_bytes))

    def add(self, job: ClipJob, clip: PreparedClip) -> None:
        self.clips.append((job, clip))
        self.held.add(clip)
        self.asked += len(job.questions)

    def full(self) -> bool:
        return self.asked >= self.decode_batch or self.held.total >= self.hold_bytes

    def answered(self) -> Iterator[tuple[ClipJob, list[AskResult | Exception]]]:
        """Each waiting clip's job and results, in order, the group emptied (its clips released) first.
        A clip of several whose questions met a fault (not a refusal) is answered again alone, so that
        one clip's fault, or a batch too large for memory, fails only what fails alone. Errors keep no
        traceback: its frames would hold the group's clips and caches."""
        asked = [(clip, [q.question for q in job.questions]) for job, clip in self.clips]
        results = self._together(asked)
        if len(asked) > 1:
            results = [self._together([one])[0] if any(_fault(r) for r in mine) else mine
                       for one, mine in zip(asked, results, strict=True)]
        done = [(job, mine) for (job, _), mine in zip(self.clips, results, strict=True)]
        del asked, results
        self.clips, self.held, self.asked = [], HeldBytes(), 0
        yield from done

    def _together(self, asked: list[tuple[PreparedClip, list[str]]]) -> list[list[AskResult | Exception]]:
        try:
            results = self.qa.answer_together(asked) if asked else []
        except Exception as e:  # noqa: BLE001 - one group must not end the run; recorded as its questions' errors
            results = [[e] * len(questions) for _, questions in asked]
        return [[r.with_traceback(None) if isinstance(r, Exception) else r for r in mine] for mine in results]


def _fault(result: AskResult | Exception) -> bool:
    """An error that is not the question's own refusal."""
    return isinstance(result, Exception) and not isinstance(result, UserError)


def answered_jobs(qa: VideoQA, jobs: Iterable[tuple[ClipJob, DecodedVideo | UserError]], options: AskOptions,
                  decode_batch: int, hold_bytes: int) -> Iterator[tuple[ClipJob, Iterable[AskResult | Exception]]]:
    """Each job with its questions' results or errors, in the jobs' order. A clip with fewer questions
    than `decode_batch` is prepared and waits for the next ones: such clips are answered together
    (`VideoQA.answer_together`: one decoding batch, the weights read once a step for all) while their
    questions fit in `decode_batch` and their prepared state in `hold_bytes` (a group holds at most the
    budget plus the clip just prepared, and is answered as soon as it is full; 0: each clip alone). A
    clip with more questions is answered alone, `decode_batch` at a time, its results an iterator to
    consume before the next job (each is written as soon as it exists). A clip that fails (its video,
    its preparation) or whose every question is refused is recorded at once, after the clips before
    it. A record's peak memory is its group's, from its first clip's preparation to its answers (a
    clip that did not fit the group before it was prepared in that group's time, and counts it too).
    An error reading the next job (a bad line of the questions file) comes after the group's answers."""
    group = _Group(qa, decode_batch, hold_bytes)
    pending = iter(jobs)
    while True:
        try:
            job, video = next(pending)
        except StopIteration:
            break
        except Exception:
            yield from group.answered()
            raise
        questions = [q.question for q in job.questions]
        if len(questions) >= decode_batch:
            yield from group.answered()
            yield job, clip_answers(qa, video, questions, options, decode_batch)  # each written as it comes
            continue
        if not group.has_room_for(len(questions)):  # known before preparing: its group starts with it
            yield from group.answered()
        if not group.clips:
            group.memory.reset()
        try:
            if isinstance(video, UserError):
                raise video
            clip, prompts = qa.prepare_questions(video, questions, options, memory=group.memory)
        except Exception as e:  # noqa: BLE001 - one clip must not end the run; the error is recorded
            failed = [e.with_traceback(None)] * len(questions)  # its frames (a decoded video, tensors) let go
            del e
            yield from group.answered()
            yield job, failed
            continue
        if clip is None:  # every question refused: nothing to hold
            yield from group.answered()
            yield job, prompts
            continue
        if not group.fits(clip, len(questions)):
            yield from group.answered()
        group.add(job, clip)
        del clip
        if group.full():
            yield from group.answered()
    yield from group.answered()


def run_batch(qa: VideoQA, jobs: Iterator[ClipJob], root: Path, results: ResultsFile, options: AskOptions,
              tally: Tally, on_progress: Callable[[], None] = lambda: None, decode_batch: int = DECODE_BATCH,
              hold_bytes: int = GROUP_MB * 2**20) -> None:
    """Answer each job's questions, appending one record per question. A clip's questions share its
    decoding, vision tower and prompt head and are decoded `decode_batch` at a time; clips with fewer
    questions are answered several together within `hold_bytes` (`answered_jobs`). A question that
    cannot be answered (its video, its text) becomes a record with an `error` and the run goes on."""
    qa.check_options(options)  # fails every question: fail now
    for job, answers in answered_jobs(qa, prefetched(jobs, options), options, decode_batch, hold_bytes):
        write_answers(job, (answer_fields(result, job.path) for result in answers), root, results, tally,
                      on_progress)
