"""Which questions a batch or sweep asks about which videos, read from a folder and a questions file.

Accepted: a JSON-lines file of `{"video", "question", "answer"?, "id"?, "type"?}`; the MSVD-QA /
MSRVTT-QA JSON layout `[{"video_id" | "video", "question", "answer", "question_id"}]`; or no file at
all, where every video in the folder gets the same question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vidsparse.errors import UserError

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".gif", ".mpg", ".mpeg", ".flv", ".wmv"}


@dataclass(frozen=True)
class Question:
    id: str  # stable across runs: what `batch` resumes by
    video: Path
    question: str
    answer: str | None = None
    type: str | None = None


def find_videos(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively) with a video extension, sorted; hidden files and folders
    left out (macOS's `._clip.mp4` resource forks, `.cache/`): they are not the user's clips."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_questions(folder: Path, questions_file: Path | None, question: str | None) -> list[Question]:
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of videos")
    if questions_file is not None and question is not None:
        raise UserError("give a questions file or one question for every video, not both")
    if questions_file is None:
        if question is None:
            raise UserError(f"{folder} is a folder: give a questions file (--questions FILE), or one question to ask "
                            "about every video in it")
        if not question.strip():
            raise UserError("the question asked of every video is empty")
        videos = find_videos(folder)
        if not videos:
            raise UserError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) under {folder}")
        return [Question(str(v.relative_to(folder)), v, question) for v in videos]
    if not questions_file.exists():
        raise UserError(f"questions file not found: {questions_file}")
    if not questions_file.is_file():
        raise UserError(f"--questions {questions_file} is not a regular file")
    stems: dict[str, Path] | None = None
    questions, seen = [], set()
    for place, item in _read_items(questions_file):
        where = f"{questions_file}, {place}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: not a JSON object ({{\"video\": ..., \"question\": ...}})")
        question = item.get("question")
        if not isinstance(question, str):  # an empty one is that question's error, asked like any other
            raise UserError(f"{where}: needs a 'question' (a string)")
        _check_types(item, where)
        if item.get("video") is not None:
            video = folder / str(item["video"])  # an absolute path stays as it is
        elif item.get("video_id") is not None:
            if stems is None:
                stems = {p.stem: p for p in find_videos(folder)}
            key = str(item["video_id"])
            video = stems.get(key) or stems.get(f"video{key}") or folder / key
        else:
            raise UserError(f"{where}: needs 'video' (a file under {folder}) or 'video_id'")
        name = video.relative_to(folder) if video.is_relative_to(folder) else video
        given = next((item[key] for key in ("id", "question_id") if item.get(key) is not None), None)
        qid = str(given if given is not None else f"{name}|{question}")
        if qid in seen:
            raise UserError(f"{where}: id {qid!r} appears twice")
        seen.add(qid)
        answer = item.get("answer")
        questions.append(Question(qid, video, question, None if answer is None else str(answer),
                                  item.get("type")))
    if not questions:
        raise UserError(f"{questions_file} holds no questions")
    return questions


# Fields a question may have besides 'question', and the JSON types each may take (null: absent).
_FIELD_TYPES = {"video": (str,), "video_id": (str, int), "id": (str, int), "question_id": (str, int),
                "answer": (str, int, float), "type": (str, int)}


def _check_types(item: dict, where: str) -> None:
    """Refuse a field of the wrong JSON type (a list, an object, true/false) rather than answer its
    Python text."""
    for key, types in _FIELD_TYPES.items():
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            kinds = " or ".join(dict.fromkeys("a string" if t is str else "a number" for t in types))
            raise UserError(f"{where}: '{key}' must be {kinds}, got {json.dumps(value)[:60]}")


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON (Python's reader takes them): refused like any other bad JSON."""
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _read_items(path: Path) -> list[tuple[str, object]]:
    """Each item with where it is, as the user would look for it: a JSON-lines file's line number
    (blank lines counted), a JSON list's item number."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (save the file as UTF-8)") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        return [(f"item {number}", item) for number, item in enumerate(items, 1)]
    items = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            try:
                items.append((f"line {number}", json.loads(line, parse_constant=_no_constant)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
    return items
