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
