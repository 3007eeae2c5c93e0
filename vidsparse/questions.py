"""Which questions a batch or sweep asks about which videos, read from a folder and a questions file.

Accepted: a JSON-lines file of `{"video", "question", "answer"?, "id"?, "type"?}`; the MSVD-QA /
MSRVTT-QA JSON layout `[{"video_id" | "video", "question", "answer", "question_id"}]`; or no file at
all, where every video in the folder gets the same question.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


class QuestionsFileError(UserError):
    """A mistake in the questions file, found when its line is read (a run may have answered before it)."""


class QuestionSource:
    """The questions of a batch or sweep, read one at a time as they are asked.

    A JSON-lines file is streamed, so a million questions hold no more memory than one (besides the
    set of ids, which refuses one given twice) and the first is asked at once; a mistake in the file
    is found when its line is reached (the run stops there, naming it; what was answered is kept). A
    JSON list is one JSON value and is read whole. The cheap checks (folder, file, the one question)
    are made when the source is built, before anything is loaded."""

    def __init__(self, folder: Path, questions_file: Path | None, question: str | None,
                 allow_outside: bool = False):
        if not folder.exists():
            raise UserError(f"{folder}: no such folder")
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder of videos")
        if questions_file is not None and question is not None:
            raise UserError("give a questions file or one question for every video, not both")
        if questions_file is None:
            if question is None:
                raise UserError(f"{folder} is a folder: give a questions file (--questions FILE), or one question to "
                                "ask about every video in it")
            check_question_text(question, "the question asked of every video")
        elif not questions_file.exists():
            raise UserError(f"questions file not found: {questions_file}")
        elif not questions_file.is_file():
            raise UserError(f"--questions {questions_file} is not a regular file")
        self.folder, self.questions_file, self.question = folder, questions_file, question
        self.allow_outside = allow_outside
        self.ids: set[str] = set()  # every id read so far: a repeated one is refused
        self._found: list[Path] | None = None
        self._by_stem: dict[str, Path] | None = None
        if questions_file is None and not self._videos():
            raise UserError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) under {folder}")

    def count(self) -> int:
        """How many questions there are (for a progress bar), without building them."""
        if self.questions_file is None:
            return len(self._videos())
        return sum(1 for _ in _read_items(self.questions_file, parse=False))

    def __iter__(self) -> Iterator[Question]:
        self.ids.clear()
        if self.questions_file is None:
            for video in self._videos():
                name = relative_name(video, self.folder)
                self.ids.add(name)
                yield Question(name, video, self.question)
            return
        for place, item in _read_items(self.questions_file):
            where = f"{self.questions_file}, {place}"
            q = self._question(item, where)
            if q.id in self.ids:
                raise QuestionsFileError(f"{where}: id {q.id!r} appears twice")
            self.ids.add(q.id)
            yield q
        if not self.ids:
            raise QuestionsFileError(f"{self.questions_file} holds no questions")

    def _question(self, item: object, where: str) -> Question:
        if not isinstance(item, dict):
            raise QuestionsFileError(f"{where}: not a JSON object ({{\"video\": ..., \"question\": ...}})")
        question = item.get("question")
        if not isinstance(question, str):  # an empty one is that question's error, asked like any other
            raise QuestionsFileError(f"{where}: needs a 'question' (a string)")
        _check_types(item, where)
        if item.get("video") is not None:
            video = self._inside(str(item["video"]), where)
        elif item.get("video_id") is not None:
            key = str(item["video_id"])
            stems = self._stems()
            video = stems.get(key) or stems.get(f"video{key}") or self._inside(key, where)
        else:
            raise QuestionsFileError(f"{where}: needs 'video' (a file under {self.folder}) or 'video_id'")
        name = relative_name(video, self.folder)
        given = next((item[key] for key in ("id", "question_id") if item.get(key) is not None), None)
        answer = item.get("answer")
        return Question(str(given if given is not None else f"{name}|{question}"), video, question,
                        None if answer is None else str(answer), item.get("type"))

    def _videos(self) -> list[Path]:
        """The folder's videos, found once (when first needed): the folder is walked once per run."""
        if self._found is None:
            self._found = find_videos(self.folder)
        return self._found

    def _stems(self) -> dict[str, Path]:
        """The folder's videos by file stem, which MSVD-QA's `video_id` names."""
        if self._by_stem is None:
            self._by_stem = {p.stem: p for p in self._videos()}
        return self._by_stem

    def _inside(self, name: str, where: str) -> Path:
        """The video a questions file names, under the folder: `../` or an absolute path elsewhere would
        let a questions file (one from somewhere else, one a server was sent) read any file on the
        machine, so leaving the folder takes the user's word (`allow_outside`). Judged on the name, not
        on where links lead: a folder of links to clips is a folder of clips."""
        video, inside = _video_under(self.folder, name)
        if not (inside or self.allow_outside):
            raise QuestionsFileError(f"{where}: video {name!r} is outside {self.folder} (--allow-outside-folder "
                                     "reads videos wherever the questions file says)")
        return video


# A questions file names the same videos again and again: their paths are worked out once (pathlib takes
# most of the time of reading a question), for the last few thousand names, so memory stays bounded.
@functools.lru_cache(maxsize=4096)
def _video_under(folder: Path, name: str) -> tuple[Path, bool]:
    """The video `name` stands for (an absolute name stays as it is), and whether it is under `folder`:
    no `..` in it (after a link to a folder, `..` leads out of the link's target, wherever that is) and,
    if absolute, inside the folder."""
    video = folder / name
    inside = ".." not in Path(name).parts and Path(os.path.abspath(video)).is_relative_to(os.path.abspath(folder))
    return video, inside


@functools.lru_cache(maxsize=4096)
def relative_name(video: Path, folder: Path) -> str:
    """A video's name as records and ids give it: relative to the folder, or whole if it is elsewhere."""
    return str(video.relative_to(folder) if video.is_relative_to(folder) else video)


def load_questions(folder: Path, questions_file: Path | None, question: str | None,
                   allow_outside: bool = False) -> list[Question]:
    """Every question at once, for work that holds them all anyway (a sweep's cells)."""
    return list(QuestionSource(folder, questions_file, question, allow_outside))


def check_question_text(question: str, what: str = "the question") -> None:
    """Refuse a question no model can be asked: an empty one, or one that is not text (bytes that are
    not UTF-8 on a command line arrive as lone surrogates, as does a `\\udcff` escape in a JSON file;
    a tokenizer cannot take them)."""
    if not question.strip():
        raise UserError(f"{what} is empty")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = question[e.start : e.end]
        try:  # the bytes a command line held (\udc80-\udcff are how Python keeps them)
            shown = repr(bad.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:  # any other lone surrogate (a `\ud800` escape in a JSON file)
            shown = ascii(bad)
        raise UserError(f"{what} is not UTF-8 text (it holds {shown} at character {e.start + 1}): give it as "
                        "UTF-8") from None


MAX_LINE = 2**20  # bytes of one line of a questions file: a question is a sentence, not a file's worth


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
            raise QuestionsFileError(f"{where}: '{key}' must be {kinds}, got {json.dumps(value)[:60]}")


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON (Python's reader takes them): refused like any other bad JSON."""
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _read_items(path: Path, parse: bool = True) -> Iterator[tuple[str, Any]]:
    """Each item with where it is, as the user would look for it: a JSON-lines file's line number
    (blank lines counted), a JSON list's item number. A JSON-lines file is read a line at a time;
    `parse=False` only finds the items (the line's text in place of its value)."""
    with path.open("rb") as file:
        if _first_character(file) == b"[":
            yield from _list_items(path, file.read())
            return
        # Split at b"\n" only (JSON strings may hold U+2028), and never more than MAX_LINE at once.
        for number, raw in enumerate(iter(lambda: file.readline(MAX_LINE + 1), b""), 1):
            if len(raw) > MAX_LINE:
                raise QuestionsFileError(f"{path}, line {number}: longer than {MAX_LINE // 2**20} MiB, so no question")
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise QuestionsFileError(f"{path}, line {number}: not UTF-8 text (save the file as UTF-8)") from None
            if not line.strip():
                continue
            if not parse:
                yield f"line {number}", line
                continue
            try:
                yield f"line {number}", json.loads(line, parse_constant=_no_constant)
            except (ValueError, RecursionError) as e:  # a number of 5000 digits, lists nested 200k deep
                why = getattr(e, "msg", None) or e
                raise QuestionsFileError(f"{path}, line {number}: not valid JSON ({why})") from None


def _first_character(file: BinaryIO) -> bytes:
    """The file's first character that is not white space (or a byte-order mark); the file is rewound."""
    chunk = b""
    while not chunk and (block := file.read(4096)):
        chunk = block.removeprefix(b"\xef\xbb\xbf").lstrip() if file.tell() <= 4096 else block.lstrip()
    file.seek(0)
    return chunk[:1]


def _list_items(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise QuestionsFileError(f"{path}, line {line}: not UTF-8 text (save the file as UTF-8)") from None
    try:
        items = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # a number of 5000 digits, lists nested 200k deep
        raise QuestionsFileError(f"{path} is not valid JSON: {e}") from None
    for number, item in enumerate(items, 1):
        yield f"item {number}", item
