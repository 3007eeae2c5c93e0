"""The clip cache: what questions about one clip share (its decoded frames; its vision features and
prompt head through the shared layers, per pruning setting), kept across requests, least recently used
out first, within a byte budget. One thread (the scheduler's) uses it, so it needs no lock."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import torch


def nbytes(value: object, seen: set[int] | None = None) -> int:
    """The bytes of every tensor and array reachable from `value` through dataclass fields, lists,
    tuples and dicts, each storage counted once (a view shares its base's)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, np.ndarray):
        base = value if value.base is None else value.base
        if id(base) in seen or not isinstance(base, np.ndarray):
            return 0
        seen.add(id(base))
        return base.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, list | tuple):
        return sum(nbytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    return 0


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
