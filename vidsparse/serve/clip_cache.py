"""The clip cache: what questions about one clip share (its decoded frames; its vision features and
prompt head through the shared layers, per pruning setting), kept across requests, least recently used
out first, within a byte budget. One thread (the scheduler's) uses it, so it needs no lock."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from vidsparse.stats import nbytes


class ClipCache:
    """Values by key within `max_bytes`; an entry larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: Hashable) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: object) -> None:
        self.drop(key)
        size = nbytes(value)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            self.drop(next(iter(self._entries)))
        self._entries[key] = (value, size)
        self.bytes += size

    def drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def __len__(self) -> int:
        return len(self._entries)
