"""Shared fixtures: tiny checkpoints of each family saved to disk, and test clips written with PyAV."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from lab.tiny import video_llava_config, word_tokenizer

WORDS = "what is happening in the video a red green blue circle square moves left right up down color".split()


def save_tiny_checkpoint(path: Path, *, kv_heads: int | None = None, seed: int = 0, text_layers: int = 4,
                         **config) -> Path:
    """A randomly initialised tiny VideoLLaVA + word tokenizer, saved the way users' checkpoints are."""
    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(seed)
    config = video_llava_config(tokenizer, kv_heads=kv_heads, text_layers=text_layers, **config)
    model = VideoLlavaForConditionalGeneration(config)
    # Random init leaves logits nearly flat; a larger LM head makes greedy choices decisive, so that
    # comparisons between implementations are not decided by float noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """GQA decoder (4 query heads, 2 key/value heads), 32x32 frames, patch 8: 8 x 17 visual tokens."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gqa"), kv_heads=2)


@pytest.fixture(scope="session")
def tiny_checkpoint_mha(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mha"), kv_heads=None, seed=1)


@pytest.fixture(scope="session")
def tiny_onevision(tmp_path_factory) -> Path:
    """LLaVA-OneVision: SigLIP 35 px / patch 7 pooled to 3 x 3 a frame + one newline, 4-layer Qwen2 (GQA)."""
    from lab.tiny_onevision import save_tiny_onevision

    return save_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision"), text_layers=4)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """Qwen2.5-VL: dynamic resolution, 2 frames a token, M-RoPE, 4-layer decoder (GQA)."""
    from lab.tiny_qwen import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"), words=WORDS, text_layers=4)


def moving_square_frames(n: int = 24, height: int = 48, width: int = 64) -> np.ndarray:
    """A bright square moving right over a smooth gradient: easy for every codec to keep."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x * 3) % 256
        frames[i, ..., 1] = (y * 4 + i * 5) % 256
        frames[i, ..., 2] = 90
        left = (i * 2) % (width - 12)
        frames[i, 16:28, left : left + 12] = 255
    return frames


def write_video(path: Path, frames: Iterable[np.ndarray], codec: str = "libx264", fps: int = 12, *,
                muxer_options: dict[str, str] | None = None, rotation: int | None = None, title: str | None = None,
                **options: str) -> Path:
    """uint8 RGB frames (an array (T, H, W, 3) or any iterable of (H, W, 3)) -> a yuv420p clip;
    optionally with muxer options, a display rotation (degrees counter-clockwise) or a title tag."""
    with av.open(str(path), "w", options=muxer_options or {}) as container:
        if title is not None:
            container.metadata["title"] = title
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps, options=options)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                if rotation is not None:
                    stream.set_display_rotation(rotation)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Good clips in three codecs, and the bad inputs a user can hand us."""
    root = tmp_path_factory.mktemp("clips")
    frames = moving_square_frames()
    good = {
        "h264": write_video(root / "clip.mp4", frames, "libx264", crf="18"),
        "vp9": write_video(root / "clip.webm", frames, "libvpx-vp9"),
        "av1": write_video(root / "clip_av1.mp4", frames, "libsvtav1"),
    }
    data = good["h264"].read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "notes.mp4").write_text("these are not video bytes\n" * 20)
    with av.open(str(root / "empty.mp4"), "w") as container:  # a container whose stream got no frames
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height = 64, 48
        container.start_encoding()  # writes the header although no frame ever comes
        container.mux(stream.encode())
    (root / "folder").mkdir()
    bad = {
        "missing": root / "missing.mp4",
        "directory": root / "folder",
        "not_video": root / "notes.mp4",
        "truncated": root / "truncated.mp4",
        "zero_frames": root / "empty.mp4",
    }
    return {**good, **{f"bad_{k}": v for k, v in bad.items()}}


QUESTIONS = ["what color is the square ?", "what is happening ?", "what moves ?", "what is the color ?"]


@pytest.fixture(scope="session")
def folder(tmp_path_factory) -> Path:
    """Three good clips (one in a subfolder), one corrupt file, and a qa.jsonl over them."""
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    names = ["a.mp4", "b.webm", "sub/c.mp4"]
    for i, name in enumerate(names):
        write_video(root / name, moving_square_frames(20 + 4 * i), "libx264" if name.endswith("mp4") else "libvpx-vp9")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    lines = [{"video": n, "question": q, "answer": "square", "type": q.split()[1]} for n in names for q in QUESTIONS]
    lines.append({"video": "broken.mp4", "question": "what ?", "answer": "x", "type": "is"})
    (root / "qa.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def kill_9_after(command: list[str], out: Path, lines: int, timeout_s: float) -> list[str]:
    """Start `command` (a batch run writing `out`), SIGKILL it once `out` has `lines` lines, and return
    what was written: the driver-killed half of the resume tests."""
    return signal_after(command, out, lines, timeout_s, signal.SIGKILL)[0]


def signal_after(command: list[str], out: Path, lines: int, timeout_s: float, sig: int
                 ) -> tuple[list[str], int, str]:
    """Start `command` (a batch run writing `out`), send it `sig` once `out` has `lines` lines; return
    (the lines written, its exit code, its stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A shell's background job starts with SIGINT ignored and a child inherits that (Python then never
    # raises KeyboardInterrupt): start the run with SIGINT handled, as a terminal's Ctrl-C finds it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + timeout_s
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < lines):
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return out.read_text().splitlines(), process.returncode, stderr
