"""Frames -> pixel tensors, in plain torch: PIL's antialiased bicubic resampling, crop-aware, that
every family's preprocessing is built from.

HF's video processors need torchvision, which has no CPU wheel here; `preprocess_frames` reproduces
`VideoLlavaImageProcessor` (shortest edge -> bicubic resize with antialias, centre crop, /255,
CLIP mean/std) within ~1e-3 mean absolute difference (tests/unit/test_preprocess.py).
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
    """uint8 (T, H, W, 3) frames -> float32 (T, 3, size, size) normalised pixels: shortest edge to
    `size`, centre crop (CLIP's preprocessing)."""
    return normalize(resize_and_crop(frames, size), mean, std)


def resize_and_crop(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames -> float32 (T, 3, size, size) values 0..255: shortest edge to `size`,
    centre crop."""
    height, width = _frames(frames).shape[1:3]
    # Same rounding as transformers' get_resize_output_image_size (int of the scaled long edge).
    scale = size / min(height, width)
    new_h, new_w = (size, int(width * scale)) if height <= width else (int(height * scale), size)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resize_frames(frames, (new_h, new_w), (top, left, size, size))


def resize_frames(frames: np.ndarray | torch.Tensor, size: tuple[int, int],
                  crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames -> float32 (T, 3, h, w) values 0..255: PIL's antialiased bicubic
    resize to `size` (height, width), then, if given, the crop (top, left, height, width) of it.

    Resize-then-crop is computed as one crop-aware resampling, frame by frame and a band of rows at
    a time, so a 4K clip never exists as full-resolution floats (it would take ~100 MB a frame)."""
    x = _frames(frames)
    height, width = x.shape[1:3]
    new_h, new_w = size
    top, left, out_h, out_w = crop or (0, 0, new_h, new_w)
    out = torch.empty(x.shape[0], 3, out_h, out_w)
    if (new_h, new_w) == (height, width):
        out.copy_(x[:, top : top + out_h, left : left + out_w].permute(0, 3, 1, 2))
    else:
        rows, (r0, r1) = _cropped_weights(height, new_h, top, out_h)
        cols, (c0, c1) = _cropped_weights(width, new_w, left, out_w)
        for t, frame in enumerate(x):
            out[t] = _resize_like_pil(frame[r0:r1, c0:c1], rows, cols)
    return out


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """0..255 values (T, 3, h, w) -> (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (pixels / 255.0 - mean_t) / std_t


def _frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5; torch's own bicubic uses -0.75 and differs visibly)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _cropped_weights(in_size: int, out_size: int, first: int, count: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The rows `first..first+count` of the (out, in) weights of PIL's antialiased bicubic resampling
    along one axis, restricted to the input span they touch; returns (weights, (start, end) of that
    span). Only those rows and that span are computed: the whole matrix of a 16000 x 16 strip brought
    to 224 px high is 224000 x 16000 (29 GB as float64) for a crop that needs 224 x 20 of it."""
    scale = in_size / out_size
    support_scale = max(scale, 1.0)
    centers = (torch.arange(first, first + count, dtype=torch.float64) + 0.5) * scale
    lowest = (centers - 2 * support_scale + 0.5).floor().clamp(min=0)
    highest = (centers + 2 * support_scale + 0.5).floor().clamp(max=in_size)
    src = torch.arange(int(lowest[0]), int(highest[-1]), dtype=torch.float64)  # centres grow with the row
    weights = _cubic((src[None, :] - centers[:, None] + 0.5) / support_scale)
    inside = (src[None, :] >= lowest[:, None]) & (src[None, :] < highest[:, None])
    weights = weights * inside
    weights = (weights / weights.sum(1, keepdim=True)).float()
    touched = weights.abs().sum(0).nonzero().squeeze(1)
    start, end = int(touched[0]), int(touched[-1]) + 1
    offset = int(lowest[0])
    return weights[:, start:end], (offset + start, offset + end)


def _resize_like_pil(frame: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, band: int = 256) -> torch.Tensor:
    """uint8 (h, w, 3) -> float (3, out_h, out_w): horizontal pass then vertical, rounding to uint8
    after each as PIL does; the horizontal pass takes `band` input rows at a time."""
    horizontal = torch.empty(3, frame.shape[0], cols.shape[0])
    for r in range(0, frame.shape[0], band):
        chunk = frame[r : r + band].permute(2, 0, 1).float()  # (3, band, w)
        horizontal[:, r : r + band] = (chunk @ cols.T).round_().clamp_(0, 255)
    return (rows @ horizontal).round_().clamp_(0, 255)
