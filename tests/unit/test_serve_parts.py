"""The server's parts without a server: the request parser on the bodies lmms-eval sends (captured from
lmms-eval 0.7.3, trimmed), the clip cache's byte accounting and eviction order, and the Ray front's
count of the requests its replicas hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsparse.options import AskOptions, Budget
from vidsparse.serve.chat import RequestError, parse_chat
from vidsparse.serve.clip_cache import ClipCache
from vidsparse.stats import nbytes

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


# Byte pieces of a made-up tokenizer: words, a space before punctuation its clean-up removes, and a
# euro sign split over two tokens (the first alone decodes to a replacement character).
PIECES = [b"the", b" square", b" is", b" red", b" .", b" ,", b" \xe2\x82", b"\xac", b" STOP", b"ST", b"OP", b"\n",
          b" cost", b"s"]


def decode_pieces(ids: list[int]) -> str:
    text = b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")
    return text.replace(" .", ".").replace(" ,", ",").strip()


# A stop sequence may span a space and a split character, or end inside the last word (found by review).
@pytest.mark.parametrize("stops", [(), ("STOP",), ("red.", "\n"), ("€",), ("s is",), ("square is red",), ("s €",),
                                   ("costs €",)])
def test_a_streamed_answer_is_sent_in_pieces_no_later_token_takes_back(stops):
    """Random answers of those pieces: every piece sent is final (what was sent is always the start of
    the finished answer, cut at its first stop sequence: nothing of a stop sequence or of a split
    character is sent early), decoding stops at the token that completes a stop sequence, and what is
    left to send at the end (what the server sends after the last piece) completes the answer."""
    from vidsparse.serve.feed import AnswerFeed

    generator = np.random.default_rng(0)
    for _ in range(300):
        ids = generator.integers(0, len(PIECES), size=int(generator.integers(1, 12))).tolist()
        sent: list[str] = []
        feed = AnswerFeed(decode_pieces, stops, sent.append)
        fed = 0
        for token in ids:
            fed += 1
            if not feed.token(token):
                break
        final = decode_pieces(ids[:fed])
        cuts = [final.find(stop) for stop in stops if stop in final]
        expected = final[: min(cuts)] if cuts else final
        stopped_at = next((n for n in range(1, len(ids) + 1)
                           if any(stop in decode_pieces(ids[:n]) for stop in stops)), None)
        assert fed == (stopped_at or len(ids)), (ids, stops)
        text = "".join(sent)
        assert expected.startswith(text), (ids, stops, sent)  # a half-sent euro sign would fail here too
        if stopped_at:
            assert text == expected  # once stopped, everything up to the stop sequence is out
        assert all(piece for piece in sent)


def test_a_feed_whose_client_left_stops_at_the_next_token():
    from vidsparse.serve.feed import AnswerFeed

    feed = AnswerFeed(decode_pieces, (), None)
    assert feed.token(0) and feed.token(1)
    feed.leave()
    assert not feed.token(2) and feed.tokens == [0, 1]


def test_a_stream_closed_while_waiting_leaves_no_task_behind():
    """The client leaves while its stream waits for the next piece: the work and the wait for a piece
    are both cancelled (a pending wait was left behind before a review found it)."""
    import asyncio
    import contextlib

    from vidsparse.serve.backend import pieces_then_result

    async def main() -> list:
        never = asyncio.Event()

        async def answer(send):
            send("a")
            await never.wait()

        events = pieces_then_result(answer)
        assert await anext(events) == "a"
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.01)
        waiting.cancel()  # as Starlette cancels a stream whose client has gone
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        for _ in range(3):
            await asyncio.sleep(0)
        return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    assert asyncio.run(main()) == []


def test_the_ray_front_counts_the_requests_its_replicas_have_not_answered():
    """The Ray front's queue depth (its /metrics gauge): a request counts from when it is sent to a
    replica until its answer, its refusal, or its client's leaving (which cancels the replica's work)."""
    pytest.importorskip("ray.serve")
    import asyncio

    from vidsparse.serve.ray_serve import RayBackend

    class Call:
        """A replica's pending answer, settled by the test."""

        def __init__(self):
            self.future = asyncio.get_running_loop().create_future()

        def __await__(self):
            return self.future.__await__()

        def cancel(self):
            self.future.cancel()

    class Replicas:  # the deployment handle: options(...).complete.remote(...)
        def __init__(self):
            self.calls = []

        def options(self, **_):
            return self

        @property
        def complete(self):
            return self

        def remote(self, *_):
            self.calls.append(Call())
            return self.calls[-1]

    class Clip:
        digest = "sha256:clip"

        def portable(self):
            return self

    async def scenario():
        replicas, leaving = Replicas(), asyncio.Event()
        backend = RayBackend(replicas)

        async def gone():
            return leaving.is_set()

        answered = asyncio.ensure_future(backend.complete("chat", Clip()))
        refused = asyncio.ensure_future(backend.complete("chat", Clip()))
        left = asyncio.ensure_future(backend.complete("chat", Clip(), gone))
        await asyncio.sleep(0.01)
        assert backend.depth == 3 and len(replicas.calls) == 3
        replicas.calls[0].future.set_result("the answer")
        assert await answered == "the answer" and backend.depth == 2
        replicas.calls[1].future.set_exception(RequestError(400, "a refusal inside the replica"))
        with pytest.raises(RequestError):
            await refused
        assert backend.depth == 1
        leaving.set()
        assert await left is None and replicas.calls[2].future.cancelled() and backend.depth == 0

    asyncio.run(scenario())
