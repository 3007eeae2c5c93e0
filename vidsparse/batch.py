"""`vidsparse batch`: answer every question of a folder, resumably, one video decoded once.

The model is loaded once; questions are grouped by video; the next video is decoded on a
background thread while the current one is answered. Each answer (or error) is appended to the
results file as soon as it exists, so a killed run loses at most the question in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vidsparse.answer import AskResult
from vidsparse.errors import UserError
from vidsparse.metrics import is_correct
from vidsparse.options import DECODE_BATCH, AskOptions
from vidsparse.pipeline import VideoQA
from vidsparse.questions import Question
from vidsparse.results import ResultsFile
from vidsparse.video import DecodedVideo, decode_video


def batch_settings(model: str, dtype: str, device: str, options: AskOptions) -> dict[str, Any]:
    """What decides the answers of a batch (and so what a results file must not mix): the checkpoint
    and its weights, the dtype it runs in (resolved: `auto` differs between CPU and GPU) and every
    answer option."""
    from vidsparse.models.loading import find_checkpoint, resolve_device, resolve_dtype, weights_fingerprint

    source = find_checkpoint(model)
    resolved = resolve_dtype(dtype, resolve_device(device))
    return {"model": source.identity, "weights": weights_fingerprint(source),
            "dtype": str(resolved).removeprefix("torch."), **options.settings()}


def source_settings(videos: Path, questions_file: Path | None, question: str | None) -> dict[str, Any]:
    """Which questions about which videos (results-file settings too): without them a second folder,
    or another --question about the same clips, would be taken for answers already given (the ids
    of --question are the videos' names)."""
    return {"videos": str(videos.resolve()), "questions": None if questions_file is None else str(
        questions_file.resolve()), "question": question}


def group_by_video(questions: list[Question]) -> dict[Path, list[Question]]:
    groups: dict[Path, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.video, []).append(q)
    return groups


def clips_to_answer(questions: list[Question], results: ResultsFile) -> dict[Path, list[Question]]:
    """The questions not yet in `results`, grouped by video: what a run (or a resumed one) answers."""
    done = results.done_ids()
    return group_by_video([q for q in questions if q.id not in done])


def check_same_questions(questions: list[Question], root: Path, results: ResultsFile) -> None:
    """A recorded id must still mean the same question: an edited questions file that reuses an id
    would otherwise be skipped as answered, and its old answer reported as the new one's. An error
    record retried (`retry_errors`) may have changed: correcting the question is how its cause is
    fixed, and the new record supersedes the error."""
    recorded = results.latest()
    for q in questions:
        record = recorded.get(q.id)
        if record is None or (results.retry_errors and record.get("error")):
            continue
        now = question_record(q, root)
        differ = [key for key in ("video", "question", "reference") if key in record and record[key] != now[key]]
        if differ:
            key = differ[0]
            fix = ("it was recorded with an error: --retry-errors asks it again as it is now" if record.get("error")
                   else "restore them, or choose a new --out")
            raise UserError(f"{results.path}: id {q.id!r} was recorded with {key} {record[key]!r}, the questions "
                            f"now give {now[key]!r}; the questions changed since that run: {fix}")


def prefetched(videos: list[Path], options: AskOptions) -> Iterator[tuple[Path, DecodedVideo | UserError]]:
    """Decoded videos in order, the next one decoding on a thread while the caller works."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:

        def submit(path: Path) -> Future:
            return pool.submit(decode_video, path, options.num_frames, options.backend)

        pending = submit(videos[0]) if videos else None
        for i, path in enumerate(videos):
            current = pending
            pending = submit(videos[i + 1]) if i + 1 < len(videos) else None
            try:
                yield path, current.result()
            except UserError as e:
                yield path, e


def question_record(q: Question, root: Path) -> dict[str, Any]:
    video = q.video.relative_to(root) if q.video.is_relative_to(root) else q.video
    return {"id": q.id, "video": str(video), "question": q.question, "type": q.type, "reference": q.answer}


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


def run_batch(qa: VideoQA, questions: list[Question], root: Path, results: ResultsFile, options: AskOptions,
              on_record: Callable[[dict[str, Any]], None] = lambda record: None,
              decode_batch: int = DECODE_BATCH) -> None:
    """Answer the questions not yet in `results`, appending one record per question. A clip's
    questions share its decoding, vision tower and prompt head and are decoded `decode_batch` at a
    time (VideoQA.answer_clip). A question that
    cannot be answered (its video, its text) becomes a record with an `error` and the run goes on."""
    qa.model.check_context(None, options.num_frames, options.max_new_tokens)  # fails every question: fail now
    groups = clips_to_answer(questions, results)
    for path, video in prefetched(list(groups), options):
        group = groups[path]
        for q, result in zip(group, clip_answers(qa, video, [q.question for q in group], options,
                                                          decode_batch), strict=True):
            record = answer_record(q, root, answer_fields(result, path))
            results.append(record)
            on_record(record)
