"""The server's parts without a server: the request parser on the bodies lmms-eval sends (captured from
lmms-eval 0.7.3, trimmed), and the clip cache's byte accounting and eviction order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsparse.options import AskOptions, Budget
from vidsparse.serve.chat import RequestError, parse_chat
from vidsparse.serve.clip_cache import ClipCache, nbytes

DEFAULTS = AskOptions(max_new_tokens=64)
PNG = "data:image/png;base64,iVBORw0KGgo="

# lmms-eval --model openai --model_args model=NAME,pass_video_url=True
LMMS_VIDEO_URL = {"model": "vidsparse-shapes", "messages": [{"role": "user", "content": [
    {"type": "video_url", "video_url": {"url": "file:///work/lmms/shapes/00001.mp4"}},
    {"type": "text", "text": "what shape is the green object ?"}]}],
    "max_tokens": 16, "temperature": 0.0, "media_io_kwargs": {"video": {"num_frames": 10}}}
# ... with --force_simple: the text first, then the frames as PNG data URIs.
LMMS_SIMPLE = {"model": "vidsparse-shapes", "messages": [{"role": "user", "content": [
    {"type": "text", "text": "which color appears second ?"},
    *({"type": "image_url", "image_url": {"url": PNG}} for _ in range(8))]}],
    "max_tokens": 16, "temperature": 0.0}


def test_lmms_evals_video_url_request():
    chat = parse_chat(LMMS_VIDEO_URL, DEFAULTS, 256)
    assert chat.question == "what shape is the green object ?"
    assert chat.media.video == "file:///work/lmms/shapes/00001.mp4" and chat.media.images == ()
    # Its frame count is honoured (as vLLM does), and its answer length.
    assert chat.options.num_frames == 10 and chat.options.max_new_tokens == 16
    assert not chat.stream and chat.stop == ()


def test_lmms_evals_frames_request():
    chat = parse_chat(LMMS_SIMPLE, DEFAULTS, 256)
    assert chat.question == "which color appears second ?"
    assert chat.media.video is None and chat.media.images == (PNG,) * 8
    assert chat.options.num_frames == DEFAULTS.num_frames


def test_the_vidsparse_object_overrides_the_defaults_and_the_media_frames():
    body = {**LMMS_VIDEO_URL, "vidsparse": {"method": "stprune", "budget": "10%", "frames": 6},
            "max_completion_tokens": 1000, "unknown_top_level_key": {"ignored": True}}
    options = parse_chat(body, DEFAULTS, 32).options
    assert (options.method, options.budget, options.num_frames) == ("stprune", Budget(share=0.1), 6)
    assert options.max_new_tokens == 32  # capped at the server's limit


@pytest.mark.parametrize(("change", "param"), [
    ({"temperature": 0.5}, "temperature"), ({"stop": ["a"] * 5}, "stop"), ({"stream": "yes"}, "stream"),
    ({"max_tokens": 0}, "max_tokens"), ({"vidsparse": {"positions": "sideways"}}, "vidsparse"),
    ({"vidsparse": {"fps": -1}}, "vidsparse"), ({"vidsparse": "stprune"}, "vidsparse"), ({"model": ""}, "model"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}]}, "messages"),
])
def test_a_bad_field_is_a_400_naming_it(change, param):
    with pytest.raises(RequestError) as refused:
        parse_chat({**LMMS_VIDEO_URL, **change}, DEFAULTS, 256)
    assert refused.value.status == 400 and refused.value.param == param and "\n" not in refused.value.message


def test_nbytes_counts_each_storage_once():
    base = torch.zeros(10, 4)  # 160 bytes
    frames = np.zeros((2, 3, 3, 3), np.uint8)  # 54 bytes
    assert nbytes({"a": base, "b": [base[2:], base.view(-1)], "frames": (frames, frames[0])}) == 160 + 54


def test_the_cache_evicts_least_recently_used_first_within_its_bytes():
    cache = ClipCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, torch.zeros(100))  # 400 bytes each: full
    assert cache.get("a") is not None  # a is now the most recent; b the least
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    assert cache.bytes == 1200 and len(cache) == 3
    cache.put("huge", torch.zeros(1000))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 3
    cache.put("e", torch.zeros(200))  # 800 bytes: the two least recent go
    assert [k for k in "acde" if cache.get(k) is not None] == ["d", "e"] and cache.bytes == 1200
