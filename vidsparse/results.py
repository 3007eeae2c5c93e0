"""An append-only JSON-lines results file that survives being killed at any moment.

Each record is written whole with one write, flushed and fsynced, so a SIGKILL can leave at most
one partial last line; opening the file again cuts that line off before anything is appended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ResultsFile:
    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            self._load_and_repair()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # held open for the whole run

    def _load_and_repair(self) -> None:
        data = self.path.read_bytes()
        good = 0  # byte length of the complete, valid lines
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def done_ids(self) -> set[str]:
        return {str(r["id"]) for r in self.records if "id" in r}

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
