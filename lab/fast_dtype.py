"""Which floating-point type is fast on this machine. A CPU without native bfloat16 (AVX2 only) runs a
bf16 matmul over 100x slower than fp32, while one with AVX-512 BF16 or AMX runs it faster: never
assume, time it."""

from __future__ import annotations

import time

import torch


def fastest_dtype(device: torch.device) -> tuple[str, str]:
    """The dtype to run in on ``device`` (the benchmarks, bf16 autocast in training), and why: on a GPU
    bfloat16 where it has it, else float16; on a CPU bfloat16 and float32 are timed on a small matmul
    and the faster wins."""
    if device.type == "cuda":
        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return name, f"{torch.cuda.get_device_name(device)} {'supports' if name == 'bfloat16' else 'lacks'} bf16"
    rates = {name: matmul_rate(getattr(torch, name)) for name in ("bfloat16", "float32")}
    best = max(rates, key=rates.get)
    return best, ", ".join(f"{name} matmul {rate:.3f} TFLOP/s" for name, rate in rates.items()) + " on this CPU"


def matmul_rate(dtype: torch.dtype, size: int = 512) -> float:
    """Best of 3 timings of a size^3 matmul, in TFLOP/s (2 per multiply-add); small enough to take
    about a second even where the dtype has no native support."""
    a = torch.randn(size, size, dtype=dtype)
    a @ a
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12
