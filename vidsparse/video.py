"""Video file -> uniformly sampled uint8 frames, with decord first and PyAV as the fallback.

decord is fast at random access but bundles an old FFmpeg (no AV1); PyAV decodes everything
FFmpeg does. `auto` tries decord and falls back to PyAV when decord is missing or fails.
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np

from vidsparse.errors import UserError
from vidsparse.options import AskOptions, Backend


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    indices: list[int]  # frame numbers sampled from the clip
    fps: float
    duration: float  # seconds
    backend: str
    total_frames: int
    seconds: float = 0.0  # wall time spent decoding


# Real video is at most about 4:1 (panoramic 32:9 is 3.6:1, a 360-degree equirectangular clip 2:1); at
# 100:1 the square centre crop the model sees is already 1% of the picture, so past it no answer could
# be about the clip.
MAX_ASPECT_RATIO = 100
# 16K video is 15360 px wide, and H.264 and HEVC allow no side beyond about 16900 px.
MAX_SIDE = 16384
# 8K UHD (7680 x 4320), the largest picture broadcast and cameras make: the sampled frames are kept whole
# (100 MB each at this size), so a few-KB file of a larger picture could otherwise ask for gigabytes.
MAX_PIXELS = 7680 * 4320


@dataclass(frozen=True)
class Header:
    """What the container says of its first video stream, read without decoding a frame."""

    width: int  # 0 where the header does not say
    height: int
    image: str | None = None  # the picture's codec (png, mjpeg, ...) when the file is a still image


class DecodeError(Exception):
    """A backend could not decode the file (another backend may still manage)."""


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over the whole clip, first and last frame included
    (Video-LLaVA's own sampling: linspace(0, total - 1)). Short clips repeat frames."""
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()


FrameCount = Callable[[int, float], int]  # (frames in the clip, its frame rate or 0) -> frames to sample


def _decode_decord(path: Path, count: FrameCount) -> DecodedVideo:
    try:
        import decord
    except ImportError as e:
        raise DecodeError("decord is not installed") from e
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total == 0:
            raise DecodeError("the video has no frames")
        fps = _finite(float(reader.get_avg_fps()))
        indices = sample_indices(total, count(total, fps))
        frames = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError) as e:
        raise DecodeError(_clean_decord_message(str(e))) from e
    if frames.ndim != 4 or frames.shape[-1] != 3:  # e.g. a clip rotated by 90 degrees comes out with 4 channels
        raise DecodeError(f"decord returned frames of shape {frames.shape[1:]}, not RGB")
    return DecodedVideo(frames, indices, _finite(fps), _duration(total, fps), "decord", total)


def _decode_pyav(path: Path, count: FrameCount) -> DecodedVideo:
    """Decode every frame once (the only reliable count: headers lie for truncated files) but keep
    only the sampled ones, so memory does not grow with the clip. The sample is chosen from the
    count the header promises (or a packet count); if decoding finds another count, a second pass
    takes the frames that count samples."""
    import av

    try:
        with av.open(str(path), metadata_errors="replace") as container:
            if not container.streams.video:
                raise DecodeError("the file has no video stream")
            stream = container.streams.video[0]
            fps = _finite(float(stream.average_rate or stream.guessed_rate or 0))
            expected = max(1, stream.frames or sum(1 for packet in container.demux(stream) if packet.size))
        frames, total = _pyav_pass(path, set(sample_indices(expected, count(expected, fps))))
        if total == 0:
            raise DecodeError("the video has no frames")
        indices = sample_indices(total, count(total, fps))
        if not set(indices) <= frames.keys():
            frames, _ = _pyav_pass(path, set(indices))
    except av.FFmpegError as e:
        raise DecodeError(e.strerror or str(e)) from e
    return DecodedVideo(np.stack([frames[i] for i in indices]), indices, _finite(fps), _duration(total, fps), "pyav",
                        total)


def _pyav_pass(path: Path, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """One decoding pass: the `wanted` frames as upright RGB arrays, and how many frames there are."""
    import av

    kept: dict[int, np.ndarray] = {}
    total = 0
    with av.open(str(path), metadata_errors="replace") as container:
        for total, frame in enumerate(container.decode(container.streams.video[0]), 1):
            if total - 1 in wanted:
                kept[total - 1] = _upright(frame.to_ndarray(format="rgb24"), frame.rotation)
    return kept, total


def _upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """Apply the clip's display rotation (counter-clockwise degrees, e.g. a phone filmed upright)."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _finite(fps: float) -> float:
    """Frames per second as a JSON-safe number: 0.0 where the container gives none (or NaN)."""
    return fps if math.isfinite(fps) and fps > 0 else 0.0


def _duration(total: int, fps: float) -> float:
    return total / fps if _finite(fps) else 0.0


_DECODERS = {"decord": _decode_decord, "pyav": _decode_pyav}


def _clean_decord_message(message: str) -> str:
    """decord's errors carry a timestamp, a source location and a C++ check; keep the reason."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if "ERROR" in first:
        first = first.rsplit("ERROR", 1)[1]
    return re.sub(r"^\[[\d:]+\] \S+: ", "", first).strip(" :")


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The FFmpeg inside decord and PyAV logs to file descriptor 2 directly; the caller reports
    failures itself, in one line, so that noise is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_video_file(path: Path) -> None:
    """A video must be a readable regular file: a FIFO or a device would block or stream forever."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"video not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeEncodeError:  # a lone surrogate (a `\ud800` escape in a questions file): not a name at all
        raise UserError(f"video not found: {ascii(str(path))} is not valid text for a file name") from None
    except ValueError:  # a NUL byte, which no file name can hold (a questions file may still give one)
        raise UserError(f"video not found: {str(path)!r} holds a NUL byte, which no file name can") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory, not a video file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path} is not a regular file (a pipe, socket or device), so not a video file")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied")


def read_header(path: Path) -> Header | None:
    """The first video stream's header as PyAV reads it (a few hundred microseconds: no frame is
    decoded); None when there is none to read, and the decoders are left to say why."""
    import av

    try:
        with _native_stderr_silenced(), av.open(str(path), metadata_errors="replace") as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            codec = stream.codec_context
            return Header(codec.width, codec.height, _still_image_format(container, stream))
    except Exception:  # noqa: BLE001 - a damaged file can make FFmpeg raise anything; decoding reports it
        return None


def _still_image_format(container, stream) -> str | None:
    """The picture's format (png, jpeg, ...) if FFmpeg reads the file as a picture: with an image
    demuxer (png_pipe, jpeg_pipe, ..., image2 for e.g. TGA, ico), whatever the file's name, or as a GIF
    or APNG of a single frame (an animated one is a clip); None for a video."""
    demuxer = container.format.name
    if demuxer == "image2":  # FFmpeg's reader of picture files it knows by their extension
        return stream.codec_context.name
    if demuxer.endswith("_pipe") or demuxer == "ico":
        return demuxer.removesuffix("_pipe")
    if demuxer in ("gif", "apng") and len(list(islice((p for p in container.demux(stream) if p.size), 2))) < 2:
        return demuxer
    return None


def check_header(path: Path, header: Header) -> None:
    """Refuse, before any frame is decoded, an image (it would pass for a clip of one still frame
    repeated) and a geometry no video has."""
    if header.image is not None:
        raise UserError(f"{path} is an image ({header.image}), not a video: vidsparse answers questions about "
                        "clips (mp4, webm, mkv, ...)")
    width, height = header.width, header.height
    if min(width, height) < 1:  # the header does not say: the decoded frames are taken as they come
        return
    if max(width, height) > MAX_SIDE:
        raise UserError(f"{path} is {width}x{height} pixels: a side beyond {MAX_SIDE} px is more than video "
                        "codecs make (16K video is 15360 wide)")
    if width * height > MAX_PIXELS:
        raise UserError(f"{path} is {width}x{height} pixels, more than 8K video's {MAX_PIXELS / 1e6:.1f} megapixels: "
                        "its frames would take gigabytes of memory; scale it down first")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UserError(f"{path} is {width}x{height} pixels, an aspect ratio beyond {MAX_ASPECT_RATIO}:1: the "
                        "model's square centre crop would see under 1% of it (video is at most about 4:1)")


def decode_clip(path: str | Path, options: AskOptions) -> DecodedVideo:
    """`decode_video` sampling as the options say: a count of frames, or a rate a second of video."""
    return decode_video(path, options.num_frames, options.backend, count=options.frames_for)


def decode_video(path: str | Path, num_frames: int = 8, backend: Backend = "auto", *,
                 count: FrameCount | None = None) -> DecodedVideo:
    """Decode `num_frames` uniformly sampled RGB frames (or as many as `count` says for the clip's
    length and frame rate); bad input raises UserError (an image or an absurd geometry read from the
    header, before any frame is decoded)."""
    path = Path(path)
    check_video_file(path)
    if num_frames < 1:
        raise UserError(f"--frames must be at least 1, got {num_frames}")
    if backend not in ("auto", *_DECODERS):
        raise UserError(f"unknown backend {backend!r}: choose auto, decord or pyav")
    header = read_header(path)
    if header is not None:
        check_header(path, header)
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    failures = []
    start = time.perf_counter()
    for name in order:
        try:
            with _native_stderr_silenced():
                decoded = _DECODERS[name](path, count or (lambda total, fps: num_frames))
            return replace(decoded, seconds=time.perf_counter() - start)
        except UserError:  # the clip cannot be sampled as asked (no frame rate for --fps): no decoder can
            raise
        except DecodeError as e:
            failures.append(f"{name}: {e}")
        except Exception as e:  # noqa: BLE001 - a damaged file can make a decoder raise anything
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e).strip() else ''}")
    hint = " (try --backend pyav)" if backend == "decord" else ""
    raise UserError(f"cannot decode {path}: not a video, or corrupt/truncated ({'; '.join(failures)}){hint}")
