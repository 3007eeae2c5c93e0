import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import moving_square_frames, write_video
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


def test_a_fifo_is_refused_before_opening(tmp_path):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: forever
    with pytest.raises(UserError, match="not a regular file"):
        decode_video(fifo, 8)


def all_frames_reference(path):
    """What the PyAV path did before it kept only the sampled frames: every frame decoded and held."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_pyav_gives_the_frames_of_the_real_count_when_the_header_lies(tmp_path):
    """A truncated file whose header (moov first) still promises every frame: the sample is taken
    over the frames that really decode, exactly as decoding everything first would take it."""
    import av

    path = write_video(tmp_path / "faststart.mp4", moving_square_frames(40), crf="18",
                       muxer_options={"movflags": "faststart"})
    with av.open(str(path)) as container:  # cut the file right after a packet: the rest is simply gone
        ends = [packet.pos + packet.size for packet in container.demux(video=0) if packet.size]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: sorted(ends)[len(ends) // 2]])
    with av.open(str(cut)) as container:
        promised = container.streams.video[0].frames
    reference = all_frames_reference(cut)
    assert promised == 40 and 0 < len(reference) < 40  # the header does lie
    video = decode_video(cut, 8, backend="pyav")
    assert video.total_frames == len(reference) and video.indices == sample_indices(len(reference), 8)
    assert np.array_equal(video.frames, np.stack([reference[i] for i in video.indices]))


LONG_CLIP_SCRIPT = """
import re, sys
from pathlib import Path
from vidsparse.video import decode_video
def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
before = kb("VmRSS")
decode_video(sys.argv[1], 8, backend=sys.argv[2])
print(kb("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc (Linux)")
def test_pyav_memory_does_not_grow_with_the_clip(tmp_path):
    """600 frames of 320x240 (about 70 MB as decoded YUV, 140 MB as RGB): the PyAV path's peak is
    within 1.2x (+ 8 MB) of decord's on the same clip, where holding every frame took ~100 MB more."""
    def frames():
        frame = np.zeros((240, 320, 3), np.uint8)
        for i in range(600):
            frame[:] = 40
            frame[100:140, (i * 3) % 280 : (i * 3) % 280 + 40] = 250
            yield frame

    path = write_video(tmp_path / "long.mp4", frames(), fps=30, preset="ultrafast", crf="35")
    peaks = {}
    for backend in ("decord", "pyav"):
        done = subprocess.run([sys.executable, "-c", LONG_CLIP_SCRIPT, str(path), backend], capture_output=True,
                              text=True, timeout=120, check=True)
        peaks[backend] = int(done.stdout.split()[-1])
    assert peaks["pyav"] <= 1.2 * peaks["decord"] + 8 * 1024, peaks


@pytest.mark.parametrize("degrees, turns", [(90, 1), (180, 2), (-90, 3)])
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_display_rotation_is_applied(tmp_path, degrees, turns, backend):
    """A phone clip filmed upright is stored sideways with a display matrix; the model must see it
    upright. Reference: the stored frames turned counter-clockwise by the matrix's angle."""
    frames = moving_square_frames(12)
    path = write_video(tmp_path / f"rotated{degrees}.mp4", frames, crf="18", rotation=degrees)
    video = decode_video(path, 4, backend=backend)
    upright = np.rot90(frames[video.indices], turns, axes=(1, 2))
    assert video.frames.shape == upright.shape
    assert np.abs(video.frames.astype(int) - upright).mean() < 6


def test_metadata_that_is_not_utf8_does_not_stop_pyav(tmp_path, clips):
    path = write_video(tmp_path / "titled.mp4", moving_square_frames(), crf="18", title="TITLE-MARKER")
    data = path.read_bytes()
    garbled = tmp_path / "garbled.mp4"
    garbled.write_bytes(data.replace(b"TITLE-MARKER", b"\xff\xfe\xfa\xff-MARKER"))
    clean = decode_video(path, 8, backend="pyav")
    video = decode_video(garbled, 8, backend="pyav")  # PyAV used to raise UnicodeDecodeError here
    assert np.array_equal(video.frames, clean.frames)


def test_frame_rates_are_json_safe(clips, monkeypatch):
    """A container without frame durations makes decord report NaN fps; --json must stay valid."""
    import decord

    monkeypatch.setattr(decord.VideoReader, "get_avg_fps", lambda self: float("nan"))
    video = decode_video(clips["h264"], 8, backend="decord")
    assert video.fps == 0.0 and video.duration == 0.0


def solid_clip(path, width, height, frames=2):
    """A few frames of one colour, losslessly (FFV1 takes any even size; H.264 levels stop near 16900 px)."""
    return write_video(path, np.full((frames, height, width, 3), 200, np.uint8), "ffv1")


@pytest.fixture
def decoders_called(monkeypatch):
    """The backends replaced by ones that only record their name: what a refusal from the header must
    leave empty."""
    from vidsparse import video

    called = []
    monkeypatch.setattr(video, "_DECODERS", {name: lambda *a, name=name: called.append(name)
                                             for name in video._DECODERS})
    return called


@pytest.mark.parametrize("width, height, message", [(16000, 16, "aspect ratio beyond 100:1"),
                                                    (16, 2000, "aspect ratio beyond 100:1"),
                                                    (16400, 200, "a side beyond 16384 px")])
def test_absurd_geometry_is_refused_from_the_header_before_decoding(tmp_path, decoders_called, width, height,
                                                                    message):
    path = solid_clip(tmp_path / f"strip{width}x{height}.mkv", width, height)
    with pytest.raises(UserError, match=f"is {width}x{height} pixels.*{message}") as info:
        decode_video(path, 8)
    assert "\n" not in str(info.value) and decoders_called == []


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_a_clip_just_inside_the_geometry_bounds_is_decoded(tmp_path, backend):
    path = solid_clip(tmp_path / "wide.mkv", 2000, 20)
    video = decode_video(path, 4, backend=backend)
    assert video.frames.shape == (4, 20, 2000, 3) and np.abs(video.frames.astype(int) - 200).max() <= 2


@pytest.mark.parametrize("name, pil_format, shown", [("still.png", "PNG", "png"), ("still.jpg", "JPEG", "jpeg"),
                                                     ("still.gif", "GIF", "gif"), ("still.tga", "TGA", "targa"),
                                                     ("holiday.mp4", "PNG", "png")])
def test_an_image_is_refused_before_decoding(tmp_path, decoders_called, name, pil_format, shown):
    """Told by what FFmpeg reads in it, not by its name (holiday.mp4 is a PNG): one picture would pass
    for a clip of a still frame repeated --frames times."""
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(moving_square_frames(1)[0]).save(path, format=pil_format)
    with pytest.raises(UserError, match=f"is an image \\({shown}\\), not a video"):
        decode_video(path, 8)
    assert decoders_called == []


def test_an_animated_gif_and_a_one_frame_video_are_clips(tmp_path):
    from PIL import Image

    frames = moving_square_frames(3)
    gif = tmp_path / "moving.gif"
    Image.fromarray(frames[0]).save(gif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=80)
    animated = decode_video(gif, 3)
    assert animated.total_frames == 3 and np.abs(animated.frames.astype(int) - frames).mean() < 12
    single = decode_video(write_video(tmp_path / "one.mp4", frames[:1], crf="18"), 2)
    assert single.total_frames == 1 and single.frames.shape == (2, 48, 64, 3)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("fps, max_frames, count", [(2, None, 4), (0.25, None, 1), (24, None, 24), (12, 10, 10)])
def test_fps_samples_by_seconds_of_video(clips, backend, fps, max_frames, count):
    """The test clip is 24 frames at 12 fps (2 s): --fps F samples 2F frames evenly, at least one, at
    most --max-frames (32 by default) and never more than the clip has; the frame numbers are the
    evenly spread ones of that count."""
    from vidsparse.options import ask_options
    from vidsparse.video import decode_clip

    video = decode_clip(clips["h264"], ask_options(fps=fps, max_frames=max_frames, backend=backend))
    assert len(video.frames) == count and video.indices == sample_indices(24, count)


def test_fps_needs_a_frame_rate_and_one_way_of_counting(tmp_path):
    from vidsparse.options import ask_options

    with pytest.raises(UserError, match="both say how many frames"):
        ask_options(num_frames=8, fps=2)
    with pytest.raises(UserError, match="--max-frames caps sampling by --fps"):
        ask_options(max_frames=8)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--fps must be a positive number"):
            ask_options(fps=bad)
    with pytest.raises(UserError, match="does not say its frame rate"):
        ask_options(fps=2).frames_for(24, 0.0)


def test_sampling_by_time_is_its_own_setting():
    """A results file records how frames were sampled; by count as earlier versions did (they resume)."""
    from vidsparse.options import ask_options

    by_count = ask_options(num_frames=8).settings()
    assert by_count["num_frames"] == 8 and "fps" not in by_count and "max_frames" not in by_count
    by_time = ask_options(fps=1.5).settings()
    assert by_time["fps"] == 1.5 and by_time["max_frames"] == 32 and "num_frames" not in by_time


def test_a_results_file_says_when_its_method_chose_while_decoding(tmp_path):
    """The methods that choose keys while decoding are the ones the settings mark, and a results file
    of `dycoke` written when it was its prefill stand-in (no mark in its header) does not resume."""
    from vidsparse.errors import UserError
    from vidsparse.options import CHOOSE_WHILE_DECODING, ask_options
    from vidsparse.pruning import METHODS
    from vidsparse.results import ResultsFile

    choosing = {name for name, method in METHODS.items() if method().decoding_layer(32) is not None}
    assert CHOOSE_WHILE_DECODING == choosing
    assert ask_options("dycoke").settings()["prunes_while_decoding"] is True
    assert "prunes_while_decoding" not in ask_options("dycoke-prefill").settings()
    earlier = {key: value for key, value in ask_options("dycoke").settings().items() if key != "prunes_while_decoding"}
    ResultsFile.open(tmp_path / "results.jsonl", earlier)
    with pytest.raises(UserError, match="prunes_while_decoding None there, True now"):
        ResultsFile.open(tmp_path / "results.jsonl", ask_options("dycoke").settings())


def test_authors_positions_are_recorded_as_what_they_mean_for_the_method():
    """`--positions authors` (the default) is `keep` for a method whose original keeps positions, and a
    results file records it so (files of earlier versions, which had `keep`, resume); the methods whose
    original renumbers record `authors`, since their answers changed with it."""
    from vidsparse.options import RENUMBERED_BY_AUTHORS, ask_options, resolve_positions

    assert ask_options("fastv").settings()["positions"] == "keep"
    assert ask_options("vidcom2").settings()["positions"] == "authors"
    assert ask_options("vidcom2", positions="keep").settings()["positions"] == "keep"
    assert RENUMBERED_BY_AUTHORS == {"vidcom2", "dycoke", "dycoke-prefill", "holitom", "flashvid"}
    for method in RENUMBERED_BY_AUTHORS:
        assert resolve_positions("authors", method, 1) == "compact"
        assert resolve_positions("authors", method, 3) == "keep"  # M-RoPE: the 3-D positions stay
    assert resolve_positions("authors", "stprune", 1) == "keep"
    assert resolve_positions("compact", "stprune", 1) == "compact"
    from vidsparse.pruning import make_plan

    with pytest.raises(ValueError, match="keep or compact"):  # a plan is made for a model: resolved first
        make_plan("vidcom2", 10, 4, positions="authors")


def test_a_results_file_records_a_tower_cut_only_where_one_runs(tmp_path):
    """A cut changes the answers, so a results file records it and one without it does not resume;
    without a cut (and for `none`, which keeps every token) the settings are those of earlier versions."""
    from vidsparse.errors import UserError
    from vidsparse.options import ask_options
    from vidsparse.results import ResultsFile

    assert "tower_cut" not in ask_options("stprune").settings()
    assert "tower_cut" not in ask_options("none", tower_cut=3).settings()
    assert ask_options("stprune", tower_cut=3).settings()["tower_cut"] == 3
    ResultsFile.open(tmp_path / "results.jsonl", ask_options("stprune").settings())
    with pytest.raises(UserError, match="tower_cut None there, 3 now"):
        ResultsFile.open(tmp_path / "results.jsonl", ask_options("stprune", tower_cut=3).settings())
    ResultsFile.open(tmp_path / "cut.jsonl", ask_options("stprune", tower_cut=3).settings())
    with pytest.raises(UserError, match="tower_cut 3 there, None now"):
        ResultsFile.open(tmp_path / "cut.jsonl", ask_options("stprune").settings())
    with pytest.raises(UserError, match="--tower-cut must be a tower layer"):
        ask_options("stprune", tower_cut=-1)


def test_only_the_methods_that_choose_by_layout_take_a_tower_cut():
    """Their first stage keeps the same tokens whatever the tokens hold (checked on two clips' worth of
    values), so it can be decided before the tower runs; the others are refused at the edge."""
    import torch

    from vidsparse.errors import UserError
    from vidsparse.models.visual import ClipGrid
    from vidsparse.pruning import METHODS, check_method
    from vidsparse.pruning.base import BEFORE_FIRST_LAYER, StageInput

    grid = ClipGrid(4, 3, 3, True)
    n = grid.frames * grid.per_frame
    index = torch.arange(n)
    for name, method in METHODS.items():
        if name == "none":
            check_method(name, None, tower_cut=0)
        elif not method.chooses_by_layout:
            with pytest.raises(UserError, match="layout alone"):
                check_method(name, None, tower_cut=0)
        else:
            check_method(name, None, tower_cut=0)
            for seed in (0, 1):
                stage = StageInput(0, 2, BEFORE_FIRST_LAYER, n, 7, torch.randn(n, 8, generator=torch.Generator()
                                   .manual_seed(seed)), index // grid.per_frame, index, index, None, 0,
                                   torch.Generator(), grid)
                kept = method().select(stage).keep.tolist()
                assert kept == method().layout_stage(grid, 7)
    assert {name for name, method in METHODS.items() if method.chooses_by_layout} == {"uniform", "stprune"}
