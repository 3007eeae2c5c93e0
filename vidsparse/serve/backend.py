"""What answers a checked request: the model in this process (`LocalBackend`: the scheduler's thread), or
Ray Serve replicas (`serve.ray_serve.RayBackend`). Either returns a `Completion`, plain values that
cross process boundaries, from which the HTTP layer builds OpenAI's response or stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from vidsparse.pipeline import VideoQA
from vidsparse.serve.chat import ChatRequest, RequestError
from vidsparse.serve.clip_cache import ClipCache
from vidsparse.serve.feed import AnswerFeed, Send, answer_text
from vidsparse.serve.media import Media
from vidsparse.serve.scheduler import Answered, Scheduler, refusal

Gone = Callable[[], Awaitable[bool]]  # whether the client has disconnected
Result = TypeVar("Result")


@dataclass(frozen=True)
class Completion:
    """A request's answer as the API shows it: the text (cut at a stop sequence), why it ended, OpenAI's
    usage, and the `vidsparse` statistics (`ask --json`'s, with `clip_cache`)."""

    text: str
    finish_reason: str
    usage: dict
    stats: dict


async def finished_unless_gone(waiting: asyncio.Future, gone: Gone | None, cancel: Callable[[], object],
                               timeout_s: float | None = None) -> bool:
    """Wait for `waiting`: True once it is done; False, after `cancel()`, if the client went away first.
    Past `timeout_s` it cancels and refuses the request with a 504. If the wait itself is cancelled (a
    stream closed, a Ray Serve request cancelled upstream), it cancels too, then lets that through."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.05)
            if done:
                return True
            if gone is not None and await gone():
                cancel()
                return False
            if deadline is not None and loop.time() > deadline:
                cancel()
                raise RequestError(504, f"no answer within the server's {timeout_s:g} s limit", kind="timeout")
    except asyncio.CancelledError:
        cancel()
        raise


async def pieces_then_result(start: Callable[[Send], Awaitable[Result]]) -> AsyncIterator[str | Result]:
    """Run `start(send)`: each piece of text it sends (from any thread) as it comes, then what it
    returns (or the exception it raises). Closing the iterator early cancels it."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.ensure_future(start(lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)))
    piece = None
    try:
        while True:
            piece = asyncio.ensure_future(pieces.get())
            await asyncio.wait({piece, task}, return_when=asyncio.FIRST_COMPLETED)
            if not piece.done():  # finished: what it sent before is queued ahead of its end
                piece.cancel()
                break
            yield piece.result()
        while not pieces.empty():
            yield pieces.get_nowait()
        yield task.result()
    finally:
        task.cancel()
        if piece is not None:
            piece.cancel()


def completion_of(chat: ChatRequest, answered: Answered) -> Completion:
    result = answered.result
    text, stopped = answer_text(result.answer, chat.stop)
    finish = "stop" if stopped or result.generated_tokens < chat.options.max_new_tokens else "length"
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
             "total_tokens": result.prompt_tokens + result.generated_tokens}
    return Completion(text, finish, usage, {**result.to_dict(), "clip_cache": "hit" if answered.cache_hit else "miss"})


class LocalBackend:
    """The loaded model in this process, behind the scheduler's bounded queue and clip cache."""

    def __init__(self, qa: VideoQA, cache_bytes: int, max_queue: int, max_video_seconds: float,
                 timeout_s: float):
        self.qa, self.timeout_s = qa, timeout_s
        self.cache_bytes, self.max_queue, self.max_video_seconds = cache_bytes, max_queue, max_video_seconds
        self.scheduler: Scheduler | None = None

    def start(self) -> None:
        self.scheduler = Scheduler(self.qa, ClipCache(self.cache_bytes), self.max_queue, self.max_video_seconds)

    def close(self) -> None:
        """Answer what is queued, then stop."""
        if self.scheduler is not None:
            self.scheduler.close()

    @property
    def depth(self) -> int:
        return self.scheduler.depth if self.scheduler is not None else 0

    def check_room(self) -> None:
        """Raise QueueFull where a request now would not be queued (before its clip is fetched)."""
        self.scheduler.check_room()

    async def complete(self, chat: ChatRequest, media: Media, gone: Gone | None = None,
                       send: Send | None = None) -> Completion | None:
        """The answer, its text also sent to `send` piece by piece as it is decoded; None if the client
        went away first (its job is cancelled: if it has not started, it costs nothing; if it is
        decoding, it stops at its next token). Raises QueueFull, or the RequestError that refuses the
        request (a 504 past the timeout); a server fault propagates as it is."""
        feed = AnswerFeed(self.qa.model.decode_text, chat.stop, send)
        future = self.scheduler.submit(chat, media, feed.token)
        waiting = asyncio.wrap_future(future)

        def cancel() -> None:
            future.cancel()
            feed.leave()

        if not await finished_unless_gone(waiting, gone, cancel, self.timeout_s):
            return None
        try:
            answered = waiting.result()
        except Exception as e:  # noqa: BLE001 - a refusal (4xx) or a server fault (re-raised)
            error = refusal(e)
            if error is None:
                raise
            raise error from None
        return completion_of(chat, answered)
