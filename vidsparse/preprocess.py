"""Frames -> pixel tensors, in plain torch.

`VideoLlavaProcessor` needs torchvision, which has no CPU wheel here; this reproduces
`VideoLlavaImageProcessor` (shortest edge -> bicubic resize with antialias, centre crop, /255,
CLIP mean/std) within ~1e-3 mean absolute difference (tests/test_preprocess.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames -> float32 (T, 3, size, size) normalised pixels."""
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()
    height, width = x.shape[-2:]
    if min(height, width) != size:
        # Same rounding as transformers' get_resize_output_image_size (int of the scaled long edge).
        scale = size / min(height, width)
        new_h, new_w = (size, int(width * scale)) if height <= width else (int(height * scale), size)
        x = _resize_like_pil(x, new_h, new_w)
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return ((x / 255.0 - mean_t) / std_t).contiguous()


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5; torch's own bicubic uses -0.75 and differs visibly)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _resample_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) weights of PIL's antialiased bicubic resampling along one axis."""
    scale = in_size / out_size
    support_scale = max(scale, 1.0)
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    first = (centers - 2 * support_scale + 0.5).floor().clamp(min=0)
    last = (centers + 2 * support_scale + 0.5).floor().clamp(max=in_size)
    src = torch.arange(in_size, dtype=torch.float64)
    weights = _cubic((src[None, :] - centers[:, None] + 0.5) / support_scale)
    inside = (src[None, :] >= first[:, None]) & (src[None, :] < last[:, None])
    weights = weights * inside
    return (weights / weights.sum(1, keepdim=True)).float()


def _resize_like_pil(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Separable resize, horizontal pass then vertical, rounding to uint8 after each as PIL does."""
    x = torch.einsum("ow,nchw->ncho", _resample_matrix(x.shape[-1], width), x).round().clamp(0, 255)
    x = torch.einsum("oh,nchw->ncow", _resample_matrix(x.shape[-2], height), x).round().clamp(0, 255)
    return x
