import numpy as np
import pytest

from tests.conftest import moving_square_frames
from vidsparse.errors import UserError
from vidsparse.video import decode_video, sample_indices


def test_sample_indices_cover_the_whole_clip():
    assert sample_indices(24, 8) == [0, 3, 7, 10, 13, 16, 20, 23]
    assert sample_indices(3, 8) == [0, 0, 1, 1, 1, 1, 2, 2]  # short clips repeat frames
    assert sample_indices(100, 1) == [0]


@pytest.mark.parametrize("codec", ["h264", "vp9", "av1"])
def test_decodes_eight_uniform_frames(clips, codec):
    video = decode_video(clips[codec], num_frames=8)
    assert video.frames.shape == (8, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.total_frames == 24 and video.indices == sample_indices(24, 8)
    assert video.fps == pytest.approx(12) and video.duration == pytest.approx(2.0)
    # The frames are the ones asked for: the square's left edge moves 2 px a frame.
    truth = moving_square_frames()[video.indices]
    assert np.abs(video.frames.astype(int) - truth).mean() < 6


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_decord_and_pyav_agree(clips, codec):
    a = decode_video(clips[codec], 8, backend="decord")
    b = decode_video(clips[codec], 8, backend="pyav")
    assert (a.backend, b.backend) == ("decord", "pyav")
    assert a.indices == b.indices and a.total_frames == b.total_frames
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 1.0


def test_av1_falls_back_to_pyav(clips):
    assert decode_video(clips["av1"], 8).backend == "pyav"
    with pytest.raises(UserError, match="try --backend pyav"):
        decode_video(clips["av1"], 8, backend="decord")


@pytest.mark.parametrize(
    "name, message",
    [
        ("bad_missing", "video not found"),
        ("bad_directory", "is a directory"),
        ("bad_not_video", "not a video, or corrupt"),
        ("bad_truncated", "not a video, or corrupt"),
        ("bad_zero_frames", "not a video, or corrupt"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bad_inputs_raise_one_line_user_errors(clips, name, message, backend, capfd):
    with pytest.raises(UserError, match=message) as info:
        decode_video(clips[name], 8, backend=backend)
    assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""  # FFmpeg's own logging is kept off the terminal


def test_bad_options(clips):
    with pytest.raises(UserError, match="--frames"):
        decode_video(clips["h264"], 0)
    with pytest.raises(UserError, match="unknown backend"):
        decode_video(clips["h264"], 8, backend="opencv")
