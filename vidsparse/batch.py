"""`vidsparse batch`: answer every question of a folder, resumably, one video decoded once.

The model is loaded once; questions are grouped by video; the next video is decoded on a
background thread while the current one is answered. Each answer (or error) is appended to the
results file as soon as it exists, so a killed run loses at most the question in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vidsparse.errors import UserError
from vidsparse.metrics import is_correct
from vidsparse.pipeline import VideoQA
from vidsparse.questions import Question
from vidsparse.results import ResultsFile
from vidsparse.video import DecodedVideo, decode_video


@dataclass(frozen=True)
class AskOptions:
    """The options of one answer, as `VideoQA.ask` takes them."""

    method: str = "none"
    budget: int | str = 194
    prune_after: str | None = None
    positions: str = "keep"
    min_per_frame: int = 0
    seed: int = 0
    num_frames: int = 8
    backend: str = "auto"
    max_new_tokens: int = 64


def group_by_video(questions: list[Question]) -> dict[Path, list[Question]]:
    groups: dict[Path, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.video, []).append(q)
    return groups


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


def run_batch(qa: VideoQA, questions: list[Question], root: Path, results: ResultsFile, options: AskOptions,
              on_record: Callable[[dict[str, Any]], None] = lambda record: None) -> None:
    """Answer the questions not yet in `results`, appending one record per question."""
    done = results.done_ids()
    todo = [q for q in questions if q.id not in done]
    groups = group_by_video(todo)
    ask_options = asdict(options)
    for path, video in prefetched(list(groups), options):
        for q in groups[path]:
            record = question_record(q, root)
            try:
                if isinstance(video, UserError):
                    raise video
                stats = qa.ask(video, q.question, **ask_options).to_dict()
                stats["clip"] = stats.pop("video") | {"path": str(path)}
                record |= stats
                record["correct"] = None if q.answer is None else is_correct(stats["answer"], q.answer)
            except UserError as e:
                record["error"] = str(e)
            results.append(record)
            on_record(record)
