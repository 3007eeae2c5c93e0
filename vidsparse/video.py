"""Video file -> uniformly sampled uint8 frames, with decord first and PyAV as the fallback.

decord is fast at random access but bundles an old FFmpeg (no AV1); PyAV decodes everything
FFmpeg does. `auto` tries decord and falls back to PyAV when decord is missing or fails.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from vidsparse.errors import UserError

Backend = Literal["auto", "decord", "pyav"]


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    indices: list[int]  # frame numbers sampled from the clip
    fps: float
    duration: float  # seconds
    backend: str
    total_frames: int
    seconds: float = 0.0  # wall time spent decoding


class DecodeError(Exception):
    """A backend could not decode the file (another backend may still manage)."""


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over the whole clip, first and last frame included
    (Video-LLaVA's own sampling: linspace(0, total - 1)). Short clips repeat frames."""
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()


def _decode_decord(path: Path, num_frames: int) -> DecodedVideo:
    try:
        import decord
    except ImportError as e:
        raise DecodeError("decord is not installed") from e
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total == 0:
            raise DecodeError("the video has no frames")
        indices = sample_indices(total, num_frames)
        frames = reader.get_batch(indices).asnumpy()
        fps = float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError) as e:
        raise DecodeError(_clean_decord_message(str(e))) from e
    return DecodedVideo(frames, indices, fps, total / fps if fps else 0.0, "decord", total)


def _decode_pyav(path: Path, num_frames: int) -> DecodedVideo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError("the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            # Decoding every frame is the only reliable count (headers lie for truncated files);
            # only the sampled ones are converted to RGB.
            decoded = list(container.decode(stream))
    except av.FFmpegError as e:
        raise DecodeError(e.strerror or str(e)) from e
    total = len(decoded)
    if total == 0:
        raise DecodeError("the video has no frames")
    indices = sample_indices(total, num_frames)
    frames = np.stack([decoded[i].to_ndarray(format="rgb24") for i in indices])
    return DecodedVideo(frames, indices, fps, total / fps if fps else 0.0, "pyav", total)


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


def decode_video(path: str | Path, num_frames: int = 8, backend: Backend = "auto") -> DecodedVideo:
    """Decode `num_frames` uniformly sampled RGB frames; bad input raises UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"video not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a video file")
    if num_frames < 1:
        raise UserError(f"--frames must be at least 1, got {num_frames}")
    if backend not in ("auto", *_DECODERS):
        raise UserError(f"unknown backend {backend!r}: choose auto, decord or pyav")
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    failures = []
    start = time.perf_counter()
    for name in order:
        try:
            with _native_stderr_silenced():
                decoded = _DECODERS[name](path, num_frames)
            return replace(decoded, seconds=time.perf_counter() - start)
        except DecodeError as e:
            failures.append(f"{name}: {e}")
    hint = " (try --backend pyav)" if backend == "decord" else ""
    raise UserError(f"cannot decode {path}: not a video, or corrupt/truncated ({'; '.join(failures)}){hint}")
