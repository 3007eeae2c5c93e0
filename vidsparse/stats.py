"""Per-run measurements: stage timers with device sync, peak memory, KV-cache size, FLOPs (SPEC 2, 6)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import VideoLlavaConfig


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


def layer_flops(n: int, d: int, m: int) -> int:
    """One decoder layer on n tokens, paper convention (multiply-add = 1):
    4nd^2 (q, k, v, o projections) + 2n^2d (scores and weighted sum) + 3ndm (gated MLP)."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int) -> int:
    """LLM prefill FLOPs, summed over layers with the number of tokens *entering* each layer."""
    return sum(layer_flops(n, d, m) for n in tokens_per_layer)


def vision_flops(config: VideoLlavaConfig, num_frames: int) -> int:
    """Vision tower (every layer runs) + projector, same convention; CLIP's MLP has two matrices."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2 + 1
    d, m = vision.hidden_size, vision.intermediate_size
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    projector = n * (d * config.text_config.hidden_size + config.text_config.hidden_size ** 2)
    return num_frames * (vision.num_hidden_layers * per_layer + projector)


def equivalent_tokens(visual_per_layer: Sequence[int]) -> float:
    """Mean over decoder layers of the visual tokens entering each layer (FastV-style input counting)."""
    return sum(visual_per_layer) / len(visual_per_layer)
