"""The batch results file: the user's data, so never lost, never mixed, never written by two runs.

Layout: JSON lines. The first line is a header, `{"vidsparse": "results", "version": 1, "settings":
{...}}`, holding the settings that change answers; every other line is one record. Guarantees:

- Only a results file (or a new path) is ever opened for writing; anything else is refused whole.
- One writer: an exclusive `flock` is held for the whole run; a second run is refused at once,
  naming the process that holds the file.
- A resume must use the same settings as the file's header, or it is refused (saying which differ).
  A header without the questions' source or the weights' fingerprint (`LATER_KEYS`: a file written
  before vidsparse recorded them) is not compared on them, so that an unfinished run of an earlier
  version can still be resumed.
- A question that failed (an `error` record) is skipped like an answered one, unless the run retries
  errors (`retry_errors`, after a video was fixed): its new record is appended and supersedes the
  error (`latest_records`); nothing is ever removed.
- Each record is written whole with one write, flushed and fsynced, so a SIGKILL or a full disk can
  leave at most one partial last line (no trailing newline); opening the file again cuts exactly
  that, and nothing else. A damaged line anywhere else is an error naming it; nothing is removed.
- A Ctrl-C while a record is written takes effect once it is written and counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import threading
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from vidsparse.errors import UserError

MAGIC, VERSION = "results", 1
# Settings a header written before vidsparse recorded them may lack: where the questions come from,
# and the fingerprint of the weights.
LATER_KEYS = frozenset({"videos", "question", "weights"})
# Settings recorded only where a run uses them (a tower cut, choosing keys while decoding): a header
# that holds one was written by a run that used it, so a run without it differs.
WHERE_USED_KEYS = frozenset({"tower_cut", "prunes_while_decoding"})


class Recorded(NamedTuple):
    """What a run needs to know of an id's latest record, without holding the record: a resumed
    300k-record file is an index of a few dozen MB, not its 350 MB of records."""

    offset: int  # where its line starts (the record itself is read back from there when needed)
    question: int  # question_key of the record: whether the questions file still means the same
    failed: bool
    correct: bool | None


def question_key(record: dict[str, Any]) -> int:
    """Which question a record answers (its video, text and reference), as one number to compare."""
    return hash(tuple(None if (value := record.get(key)) is None else str(value)
                      for key in ("video", "question", "reference")))


class ResultsFile:
    """Opened in two steps, so that a second run on the same file is refused before it loads anything:
    the constructor takes the lock, `load` (once the settings are known) checks or writes the header
    and indexes the records."""

    def __init__(self, path: Path, retry_errors: bool = False):
        self.path = path
        self.retry_errors = retry_errors
        self.index: dict[str, Recorded] = {}  # each id's latest record
        self._appended = 0
        self._created = False
        self._file = self._open_locked()

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any], retry_errors: bool = False) -> ResultsFile:
        """Locked and loaded in one step, for callers that know the settings already."""
        results = cls(path, retry_errors)
        try:
            results.load(settings)
        except BaseException:
            results.close()
            raise
        return results

    def _open_locked(self) -> BinaryIO:
        """Open (creating if absent) and lock; retried if the path was replaced while we waited."""
        _check_regular_or_absent(self.path)
        # The folders this run creates: removed again with a file that never got a record.
        self._made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                existed = self.path.exists()
                # Unbuffered: a failed write must leave nothing behind in a buffer to be flushed later.
                file = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - held open (and locked) for the run
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.close()
                    holder = _lock_holder(self.path)
                    raise UserError(f"{self.path} is being written by another vidsparse batch"
                                    + (f" (process {holder})" if holder else "")
                                    + ": wait for it to finish, or choose another --out") from None
                if _same_file(file, self.path):
                    self._created = not existed
                    file.seek(0)
                    return file
                file.close()  # the run that held it removed the file: open the new one
        except OSError as e:
            raise UserError(f"cannot write the results file {self.path}: {e.strerror or e}") from None

    def load(self, settings: dict[str, Any]) -> None:
        """Write a new file's header, or check an existing one's settings and index its records, a line
        at a time (memory does not grow with the file); a partial last line is cut, and only that."""
        with open(self.path, "rb") as reader:
            header_line = reader.readline()
            if not header_line:
                self._write_line({"vidsparse": MAGIC, "version": VERSION, "settings": settings})
                return
            header = _parse(header_line) if header_line.endswith(b"\n") else None
            if not (isinstance(header, dict) and header.get("vidsparse") == MAGIC):
                raise UserError(f"{self.path} is not a vidsparse results file (it does not start with a results "
                                "header), so it is left untouched: choose another --out")
            self._check_settings(header.get("settings", {}), settings)
            offset, partial_at = len(header_line), None
            for number, line in enumerate(reader, 2):
                if not line.endswith(b"\n"):  # a cut-off last write
                    partial_at = offset
                    break
                record = _parse(line)
                if not isinstance(record, dict) or "id" not in record:
                    raise UserError(f"{self.path}, line {number}: not a results record (damaged?); nothing was "
                                    "changed. Repair or delete that line, or choose another --out")
                self._remember(record, offset)
                offset += len(line)
        if partial_at is not None:
            self._file.truncate(partial_at)

    def _remember(self, record: dict[str, Any], offset: int) -> None:
        self.index[str(record["id"])] = Recorded(offset, question_key(record), bool(record.get("error")),
                                                 record.get("correct"))

    def _check_settings(self, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
        differ = [f"{key} {recorded.get(key)!r} there, {value!r} now" for key, value in settings.items()
                  if (key in recorded or key not in LATER_KEYS) and recorded.get(key) != value]
        differ += [f"{key} {recorded[key]!r} there, None now" for key in sorted(WHERE_USED_KEYS)
                   if key in recorded and key not in settings]
        if differ:
            raise UserError(f"{self.path} holds results of other settings ({'; '.join(differ)}): resume with the "
                            "same settings, or choose a new --out")

    def is_done(self, qid: str) -> bool:
        """Whether a run skips this id: it is recorded (with `retry_errors`: answered without an error)."""
        entry = self.index.get(qid)
        return entry is not None and not (self.retry_errors and entry.failed)

    def record(self, entry: Recorded) -> dict[str, Any]:
        """The record an index entry stands for, read back from the file."""
        with open(self.path, "rb") as reader:
            reader.seek(entry.offset)
            return json.loads(reader.readline())

    def latest_records(self, ids: Container[str] | None = None) -> Iterator[dict[str, Any]]:
        """Each id's latest record (of those in `ids`), read a line at a time: a question retried after an
        error (`retry_errors`) has both lines in the file, and the new one supersedes the error."""
        with open(self.path, "rb") as reader:
            offset = len(reader.readline())
            for line in reader:
                record = _parse(line)
                if isinstance(record, dict) and "id" in record:
                    qid = str(record["id"])
                    entry = self.index.get(qid)
                    if entry is not None and entry.offset == offset and (ids is None or qid in ids):
                        yield record
                offset += len(line)

    @property
    def appended(self) -> int:
        """Records this run wrote (what an interrupted run tells the user it kept)."""
        return self._appended

    def append(self, record: dict[str, Any]) -> None:
        # A Ctrl-C between the write and the count would under-report what was kept, or let `close`
        # remove a file that holds a record: it waits until both are done.
        with _sigint_deferred():
            offset = self._write_line(record)
            self._remember(record, offset)
            self._appended += 1

    def _write_line(self, value: dict[str, Any]) -> int:
        """Append one line whole; returns where it starts."""
        line = (json.dumps(value, allow_nan=False) + "\n").encode()
        size = self._file.seek(0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:  # a raw write may write only part of the line
                view = view[self._file.write(view) :]
            os.fsync(self._file.fileno())
        except OSError as e:
            try:  # leave no partial line behind if we can
                self._file.truncate(size)
            except OSError:
                pass
            raise UserError(f"cannot write to {self.path}: {e.strerror or e}. The answers written so far are kept; "
                            "re-run the same command to resume") from None
        return size

    def close(self) -> None:
        """Release the lock; a file this run created and never wrote a record to is removed again."""
        if self._created and not self._appended:
            self.path.unlink(missing_ok=True)  # still locked: nobody can be appending to it
            for folder in self._made:  # innermost first; one that something else was written into stays
                if any(folder.iterdir()):
                    break
                folder.rmdir()
        self._file.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a SIGINT that arrives inside the block and raise it (KeyboardInterrupt) once the block is done.
    Signal handlers can only be set from the main thread, and one installed outside Python cannot be
    put back: there the block runs as is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # to the handler the run had, whatever it is


def _check_regular_or_absent(path: Path) -> None:
    try:
        found = path.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"cannot use {path} as the results file: {e.strerror}") from None
    mode = found.st_mode
    for fd, name in ((1, "standard output"), (2, "standard error")):
        try:
            own = os.path.samestat(os.fstat(fd), found)
        except OSError:  # that stream is closed
            own = False
        if own:
            raise UserError(f"--out {path} is this command's own {name}: the summary would be written over the "
                            "results; give the results their own file")
    if stat.S_ISDIR(mode):
        raise UserError(f"--out {path} is a directory; give a file name such as {path / 'results.jsonl'}")
    if not stat.S_ISREG(mode):
        raise UserError(f"--out {path} is not a regular file")


def _same_file(file: BinaryIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(file.fileno()), path.stat())
    except FileNotFoundError:
        return False


def _lock_holder(path: Path) -> int | None:
    """The process holding a flock on `path`, from /proc/locks (Linux); None where unknown."""
    try:
        inode = path.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return int(fields[4])
    except (OSError, ValueError):
        return None
    return None


def _parse(line: bytes) -> object:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, a 5000-digit number, lists nested too deep
        return None
