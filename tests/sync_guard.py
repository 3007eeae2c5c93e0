"""Finds where the pruning and decoding paths would wait for the device, on a machine without one.

On a GPU, turning a tensor into a Python value (`.item()`, `int(t)`, `if t:`, `.tolist()`, ...), or
running an operation whose output size depends on the data (`nonzero`, `unique`, boolean-mask
indexing, ...), stops the host until the device has caught up; so does copying data to the device
from the host's ordinary memory. On a CPU these cost nothing and `torch.cuda.set_sync_debug_mode`
does not exist, so this guard intercepts every torch call (a TorchFunctionMode) and records the ones
that would synchronise, when the Python line that made them is in a watched module of vidsparse.
A CPU cannot tell a host tensor from a device one, so the watched modules move no data to a device
themselves (`vidsparse.transfer.to_device` does, without blocking), and what lives on the host by
contract (a family's VisualMap, the layout's Python numbers) is read outside them. The guard sees
only the line that called torch: a helper outside the watched modules, called from them, is not
followed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import vidsparse

PACKAGE = Path(vidsparse.__file__).parent
WATCHED = (PACKAGE / "pruning", PACKAGE / "stage.py", PACKAGE / "engine.py", PACKAGE / "decoding.py",
           PACKAGE / "layers.py")
TORCH = Path(torch.__file__).parent

DEVICE_TYPES = {"cpu", "cuda", "mps", "xpu", "meta", "hpu", "mtia"}
# Turn a tensor into a Python value, or size their output by the data.
SYNCING = {"item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__", "__format__",
           "__complex__", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
           "equal", "allclose", "_local_scalar_dense"}


@dataclass(frozen=True)
class Sync:
    """One place that would wait: the operation, and the watched function and line that ran it."""

    operation: str
    where: str  # "module.py:function:line"


def _converted(index: torch.Tensor) -> bool:
    """An index that PyTorch turns into Python numbers: a boolean mask (nonzero) or a 0-d integer."""
    return index.dtype == torch.bool or (index.dim() == 0 and not index.is_floating_point())


def _is_device(value: object) -> bool:
    return isinstance(value, torch.device) or (isinstance(value, str) and value.split(":")[0] in DEVICE_TYPES)


def _data_sized(name: str, args: tuple, kwargs: dict) -> bool:
    """Calls that are fine in general but wait in this form. A move to a device counts: from the
    host's ordinary memory it synchronises the stream, and no CPU can tell a host tensor from a device
    one, so the watched modules move nothing themselves (`vidsparse.transfer.to_device` does)."""
    if name in ("to", "cuda") or (name in ("tensor", "as_tensor") and "device" in kwargs):
        return name != "to" or any(_is_device(v) for v in (*args[1:], *kwargs.values()))
    if name in ("__getitem__", "__setitem__") and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and _converted(i)
                   for i in index)
    if name == "where":
        return len(args) + len(kwargs) == 1  # torch.where(condition) is nonzero
    if name == "repeat_interleave":
        return "output_size" not in kwargs
    return False


def _watched_caller() -> str | None:
    """The first frame outside torch and this file, if it is in a watched module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if not (path.is_relative_to(TORCH) or path == Path(__file__)):
            if any(path == w or path.is_relative_to(w) for w in WATCHED):
                return f"{path.relative_to(PACKAGE)}:{frame.f_code.co_name}:{frame.f_lineno}"
            return None
        frame = frame.f_back
    return None


class _Recorder(TorchFunctionMode):
    def __init__(self, found: list[Sync]):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNCING or _data_sized(name, args, kwargs):
            where = _watched_caller()
            if where:
                self.found.append(Sync(name, where))
        return func(*args, **kwargs)


@contextmanager
def recording_syncs() -> Iterator[list[Sync]]:
    """Inside the block, every would-be synchronisation made by a watched module is appended to the
    list it yields."""
    found: list[Sync] = []
    with _Recorder(found):
        yield found
