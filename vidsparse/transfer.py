"""Host numbers onto the device without the host waiting for it.

A plain copy from ordinary (pageable) host memory to a GPU synchronises the stream: the host waits
until every kernel already queued has run. The pruning and decoding paths send small plans and
indices this way (a lattice, the clip's token places, positions), so they go through `to_device`,
which on CUDA stages them in pinned memory and copies without blocking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """`values` (a host tensor, or Python integers) on `device`, without a blocking copy on CUDA."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def arange_of(rows: range, device: torch.device) -> torch.Tensor:
    """A contiguous range of indices made on the device itself (no copy at all)."""
    return torch.arange(rows.start, rows.stop, device=device)
