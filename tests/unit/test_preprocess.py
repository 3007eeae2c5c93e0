import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import VideoLlavaImageProcessor

from vidsparse.preprocess import _cropped_weights, preprocess_frames


def smooth_frames(shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.cumsum(rng.integers(-9, 10, shape), axis=2) + 128, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "shape, size",
    [((2, 240, 320, 3), 224), ((2, 320, 240, 3), 224), ((1, 100, 150, 3), 224), ((2, 224, 224, 3), 224),
     ((2, 128, 128, 3), 32), ((1, 48, 64, 3), 32)],
)
def test_matches_transformers_image_processor(shape, size):
    frames = smooth_frames(shape)
    reference = VideoLlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    expected = reference(images=list(frames), return_tensors="pt", return_legacy_image_output=False)["pixel_values"]
    ours = preprocess_frames(frames, size)
    assert ours.shape == expected.shape == (shape[0], 3, size, size)
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().mean() < 1e-3


def test_rejects_non_uint8_frames():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(np.zeros((1, 8, 8, 3), np.float32), 8)


PREPROCESS_SCRIPT = """
import re
from pathlib import Path
import numpy as np
from vidsparse.preprocess import _cropped_weights, preprocess_frames
def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
frames = np.full((4, 1440, 2560, 3), 100, np.uint8)
preprocess_frames(frames[:1, :240, :320], 224)  # warm up torch's allocator and kernels
before = kb("VmRSS")
pixels = preprocess_frames(frames, 224)
print(kb("VmHWM") - before, tuple(pixels.shape))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc (Linux)")
def test_preprocessing_large_frames_needs_no_full_resolution_floats():
    """4 frames of 1440p are 44 MB as uint8 and 177 MB as float32 per copy; resizing then cropping
    them used to take 420 MB of working memory (now 40-65 MB, thread pools included)."""
    done = subprocess.run([sys.executable, "-c", PREPROCESS_SCRIPT], capture_output=True, text=True, timeout=120,
                          check=True)
    peak_kb, shape = done.stdout.split(maxsplit=1)
    assert shape.strip() == "(4, 3, 224, 224)"
    assert int(peak_kb) < 150 * 1024, f"{int(peak_kb) / 1024:.0f} MB above the frames"


def whole_resampling_matrix(in_size, out_size):
    """The naive reference: every (out, in) weight of PIL's antialiased bicubic along one axis
    (a = -0.5, support 2 taps scaled when shrinking, each row normalised over its window)."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    src = torch.arange(in_size, dtype=torch.float64)
    x = ((src[None, :] - centers[:, None] + 0.5) / support).abs()
    cubic = torch.where(x < 1, (1.5 * x - 2.5) * x * x + 1, torch.where(x < 2, ((x - 5) * x + 8) * x * -0.5 + 2, 0))
    first = (centers - 2 * support + 0.5).floor().clamp(min=0)
    last = (centers + 2 * support + 0.5).floor().clamp(max=in_size)
    window = (src[None, :] >= first[:, None]) & (src[None, :] < last[:, None])
    weights = cubic * window
    return (weights / weights.sum(1, keepdim=True)).float()


@pytest.mark.parametrize("in_size, out_size, size", [(240, 224, 224), (320, 298, 224), (1920, 398, 224),
                                                     (48, 32, 32), (64, 42, 32), (100, 224, 224), (16, 240, 224)])
def test_cropped_weights_are_the_crop_of_the_whole_matrix(in_size, out_size, size):
    """Only the crop's rows are computed, over the input span they touch: the same numbers as the
    whole matrix's rows, and nothing of the input outside that span is weighted."""
    first = (out_size - size) // 2
    weights, (start, end) = _cropped_weights(in_size, out_size, first, size)
    whole = whole_resampling_matrix(in_size, out_size)[first : first + size]
    assert torch.equal(weights, whole[:, start:end])
    assert not whole[:, :start].any() and not whole[:, end:].any()


STRIP_SCRIPT = """
import re, resource
from pathlib import Path
import numpy as np
from vidsparse.preprocess import _cropped_weights, preprocess_frames
def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
preprocess_frames(np.zeros((1, 240, 320, 3), np.uint8), 224)  # warm up torch's allocator and kernels
guard = (kb("VmSize") + 2 * 2**20) * 1024  # 2 GiB more at most: the old code would take 29 GB and thrash
resource.setrlimit(resource.RLIMIT_AS, (guard, guard))
before = kb("VmRSS")
shapes = [tuple(preprocess_frames(np.full((2, h, w, 3), 200, np.uint8), 224).shape) for h, w in ((16, 16000),
                                                                                              (16000, 16))]
print(kb("VmHWM") - before, shapes)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc (Linux)")
def test_an_extreme_aspect_ratio_needs_no_whole_resampling_matrix():
    """A 16000 x 16 strip is scaled to 224 x 224000 before the centre crop; the resampling matrix of
    that axis alone used to be 224000 x 16000 (29 GB). Two such frames now take a few MB."""
    done = subprocess.run([sys.executable, "-c", STRIP_SCRIPT], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-500:]
    peak_kb, shapes = done.stdout.split(maxsplit=1)
    assert shapes.strip() == "[(2, 3, 224, 224), (2, 3, 224, 224)]"
    assert int(peak_kb) < 32 * 1024, f"{int(peak_kb) / 1024:.0f} MB"
