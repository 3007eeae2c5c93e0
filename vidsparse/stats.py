"""Per-run measurements: stage timers with device sync, peak memory, KV-cache size, FLOPs (SPEC 2, 6)."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall time per named stage; the device is synchronised on entry and exit so GPU work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.calls: dict[str, list[float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.calls.setdefault(name, []).append(time.perf_counter() - start)

    @property
    def seconds(self) -> dict[str, float]:
        """Total seconds per stage."""
        return {name: sum(times) for name, times in self.calls.items()}


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Peak memory of one run. CUDA: max allocated since reset. CPU: the process's RSS high-water
    mark (VmHWM), reset per run by writing 5 to /proc/self/clear_refs (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _CLEAR_REFS.exists():
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                pass  # not permitted (some containers): the peak then spans the whole process

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmHWM")

    def current_bytes(self) -> int | None:
        """What is held now (the model's weights, mostly): a run's peak above it is its working memory."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int | None:
    if _STATUS.exists():
        match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) * 1024
    return None


@dataclass(frozen=True)
class DecoderShape:
    """The widths of a decoder layer that its FLOPs depend on, read from the layer's own modules (so
    GQA and q/k/v biases count as each family has them)."""

    width: int  # d, the hidden size
    query_width: int  # query heads x head_dim
    kv_width: int  # key/value heads x head_dim
    mlp_width: int  # m, the gated MLP's inner size
    biased_width: int  # outputs of the q/k/v projections that add a bias (0 for Llama)

    @classmethod
    def of(cls, decoder) -> DecoderShape:
        attn, mlp = decoder.layers[0].self_attn, decoder.layers[0].mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        return cls(attn.q_proj.in_features, attn.q_proj.out_features, attn.k_proj.out_features,
                   mlp.gate_proj.out_features, sum(p.out_features for p in projections if p.bias is not None))

    def layer_flops(self, n: int) -> int:
        """One decoder layer on n tokens, paper convention (multiply-add = 1): the q, k, v, o
        projections (4nd^2 without GQA), their biases, 2n^2 x query width (scores and weighted sum),
        3ndm (gated MLP)."""
        d = self.width
        projections = n * d * (2 * self.query_width + 2 * self.kv_width) + n * self.biased_width
        return projections + 2 * n * n * self.query_width + 3 * n * d * self.mlp_width


def prefill_flops(tokens_per_layer: Sequence[int], shape: DecoderShape) -> int:
    """LLM prefill FLOPs, summed over layers with the number of tokens *entering* each layer."""
    return sum(shape.layer_flops(n) for n in tokens_per_layer)


def equivalent_tokens(visual_per_layer: Sequence[int]) -> float:
    """Mean over decoder layers of the visual tokens entering each layer (FastV-style input counting)."""
    return sum(visual_per_layer) / len(visual_per_layer)


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


class HeldBytes:
    """The bytes of values held together (prepared clips waiting to be decoded, or decoding), each
    storage counted once: clips about one video share its frames."""

    def __init__(self):
        self.total = 0
        self._seen: set[int] = set()

    def add(self, value: object) -> None:
        self.total += nbytes(value, self._seen)

    def fits(self, value: object, budget: int) -> bool:
        """Whether `value` can be held too within `budget`: it does if it adds nothing (its storages are
        held already, e.g. a clip being decoded)."""
        adding = nbytes(value, set(self._seen))
        return not adding or self.total + adding <= budget
