"""What a prefill is measured against: the machine's dense-matmul peak and memory bandwidth, both
measured here, and the roofline time of a prefill from them.

A layer takes at least max(FLOPs / peak, bytes moved / bandwidth): with every visual token it is
bound by arithmetic, but ~200 tokens through a 7B-width layer can be bound by reading the layer's
weights (on an H100's nominal 3.35 TB/s and ~990 dense bf16 TFLOP/s: 0.12 ms of reading against
0.08 ms of arithmetic), where a FLOPs ratio promises speedups that no implementation could reach. On
a CPU's tens of GB/s and a few TFLOP/s the arithmetic still dominates. The bytes counted are the
least a layer must move: its weights once, its input and output rows, the keys and values it
writes; then the LM head's weights for the first token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vidsparse.stats import DecoderShape, synchronize


@dataclass(frozen=True)
class Machine:
    peak_tflops: float  # real FLOPs (2 per multiply-add) per second, dense matmul in the bench's dtype
    bandwidth_gbs: float  # bytes read + written per second by a large copy

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype) -> Machine:
        return cls(matmul_peak(device, dtype), memory_bandwidth(device))

    def describe(self) -> str:
        return f"dense-matmul peak {self.peak_tflops:.3f} TFLOP/s, memory bandwidth {self.bandwidth_gbs:.1f} GB/s"

    def seconds(self, work: Sequence[tuple[float, float]]) -> float:
        """The roofline time of (real FLOPs, bytes) steps that run one after the other."""
        return sum(max(flops / (self.peak_tflops * 1e12), moved / (self.bandwidth_gbs * 1e9)) for flops, moved in work)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 4096) -> float:
    """Best dense-matmul TFLOP/s (real FLOPs: 2 per multiply-add) of this device and dtype."""
    a = torch.randn(size // 2, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * a.shape[0] * size * size / (time.perf_counter() - start) / 1e12)
    return best


def memory_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Best GB/s of copying `megabytes` (counted once read, once written): far larger than any cache."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)
    best = 0.0
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = max(best, 2 * source.numel() / (time.perf_counter() - start) / 1e9)
    return best


def prefill_work(tokens_per_layer: Sequence[int], shape: DecoderShape, element_bytes: int,
                 vocab: int) -> list[tuple[float, float]]:
    """(real FLOPs, least bytes moved) of each decoder layer of a prefill, then of the LM head on the
    last row: a layer's weights once, its rows in and out, the keys and values it writes."""
    d, kv = shape.width, shape.kv_width
    weights = d * (2 * shape.query_width + 2 * kv) + 3 * d * shape.mlp_width
    layers = [(2 * shape.layer_flops(n), element_bytes * (weights + n * (2 * d + 2 * kv))) for n in tokens_per_layer]
    return [*layers, (2 * vocab * d, element_bytes * vocab * d)]
