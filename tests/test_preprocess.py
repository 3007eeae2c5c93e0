import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import VideoLlavaImageProcessor

from vidsparse.preprocess import preprocess_frames


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
from vidsparse.preprocess import preprocess_frames
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
