"""One inference thread behind a bounded queue. The model runs one piece of work at a time (torch
already spreads one forward over the cores); what the scheduler adds is sharing: every waiting request
about the same clip with the same settings is answered in one `answer_prepared` call (one batch
through the question rows, decoded together), and the clip's shared work comes from the clip cache
when an earlier request paid for it. A request whose client went away is dropped before it costs
anything."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

from vidsparse.answer import AskResult
from vidsparse.errors import UserError
from vidsparse.options import AskOptions, resolve_positions
from vidsparse.pipeline import PreparedClip, VideoQA
from vidsparse.serve.chat import ChatRequest, RequestError
from vidsparse.serve.clip_cache import ClipCache
from vidsparse.serve.media import Media, decoded
from vidsparse.video import DecodedVideo, decode_clip

MAX_GATHER_S = 0.02  # the longest a group waits for the questions of clients just answered


class QueueFull(Exception):
    """The queue holds as many requests as it may: the client should retry later (429)."""


@dataclass(frozen=True)
class Answered:
    """A request's result, and whether its clip's shared work came from the cache."""

    result: AskResult
    cache_hit: bool


@dataclass
class Job:
    request: ChatRequest
    media: Media
    future: Future  # Answered, or the exception that refused the request
    on_token: Callable[[int], bool]  # each token of its answer as it is decoded; False ends the answer there

    @property
    def group(self) -> tuple:
        return self.media.digest, self.request.options


class Scheduler:
    """Jobs in, answers out through each job's future; `close` drains the queue and stops."""

    def __init__(self, qa: VideoQA, cache: ClipCache, max_queue: int, max_video_seconds: float):
        self.qa, self.cache, self.max_queue = qa, cache, max_queue
        self.max_video_seconds = max_video_seconds
        self._jobs: deque[Job] = deque()
        self._in_flight, self._last_seconds = 1, 0.0  # when the last group ended: requests in flight, its time
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="vidsparse-inference", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the group being answered)."""
        return len(self._jobs)

    def check_room(self) -> None:
        """Raise QueueFull where a request now would not be queued."""
        if self._closing:
            raise QueueFull("the server is shutting down")
        if len(self._jobs) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")

    def submit(self, request: ChatRequest, media: Media, on_token: Callable[[int], bool]) -> Future:
        """Queue a request; `on_token` gets each token of its answer as it is decoded (False ends it)."""
        future: Future = Future()
        with self._ready:
            self.check_room()
            self._jobs.append(Job(request, media, future, on_token))
            self._ready.notify()
        return future

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    def _next_group(self) -> list[Job] | None:
        """The oldest job and every waiting job about the same clip with the same settings. Where fewer wait
        than were in flight when the last group ended (that group's and those waiting then), it waits a
        moment (a tenth of that group's time, at most MAX_GATHER_S) for the rest: the clients just answered
        are sending their next questions, and without it a closed loop of N clients settles into small
        groups (N - 1 and 1, or N/2 and N/2) instead of one group of N."""
        with self._ready:
            while not self._jobs and not self._closing:
                self._ready.wait()
            if not self._jobs:
                return None
            key = self._jobs[0].group
            deadline = time.monotonic() + min(MAX_GATHER_S, self._last_seconds / 10)
            while (sum(job.group == key for job in self._jobs) < self._in_flight and not self._closing
                   and (left := deadline - time.monotonic()) > 0):
                self._ready.wait(left)
            group = [job for job in self._jobs if job.group == key]
            for job in group:
                self._jobs.remove(job)
        return group

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            live = [job for job in group if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.monotonic()
            try:
                answers = self._answer(live)
            except Exception as e:  # noqa: BLE001 - what stops the whole group (the clip, the options) fails each job
                for job in live:
                    job.future.set_exception(e)
                continue
            finally:
                with self._ready:
                    self._in_flight, self._last_seconds = len(live) + len(self._jobs), time.monotonic() - start
            for job, answer in zip(live, answers, strict=True):
                if isinstance(answer, Exception):
                    job.future.set_exception(answer)
                else:
                    job.future.set_result(answer)

    def _answer(self, jobs: list[Job]) -> list[Answered | Exception]:
        options: AskOptions = jobs[0].request.options
        media = jobs[0].media
        self.qa.check_options(options)
        # `authors` positions and the mode they resolve to for this model are one setting: one entry
        positions = resolve_positions(options.positions, options.method, self.qa.model.position_dims)
        clip_key = ("clip", media.digest, replace(options, max_new_tokens=0, positions=positions))
        clip = self.cache.get(clip_key)
        hit = clip is not None
        if clip is None:
            clip = self.qa.prepare_clip(self._video(media, options), jobs[0].request.question, options, media.label)
        clip: PreparedClip = clip.asked(len(jobs))
        self.cache.put(clip_key, clip)
        results = self.qa.answer_prepared(clip, [job.request.question for job in jobs],
                                          max_new_tokens=options.max_new_tokens,
                                          on_token=lambda i, token: _going_on(jobs[i], token))
        return [r if isinstance(r, Exception) else Answered(r, hit) for r in results]

    def _video(self, media: Media, options: AskOptions) -> DecodedVideo:
        """The clip's frames as `options` sample them, decoded once per sampling."""
        key = ("video", media.digest, options.num_frames, options.fps, options.max_frames, options.backend)
        video = self.cache.get(key)
        if video is None:
            video = decoded(media, lambda path: decode_clip(path, options))
            if video.duration > self.max_video_seconds:
                raise RequestError(400, f"the video lasts {video.duration:.0f} s, more than the server's limit of "
                                        f"{self.max_video_seconds:g} s")
            self.cache.put(key, video)
        return video


def _going_on(job: Job, token: int) -> bool:
    """A job's hook, whose failure (its client's event loop closing under it) must not end the answers
    decoded with it: that job is taken as left."""
    try:
        return job.on_token(token)
    except Exception:  # noqa: BLE001 - one job's hook: the others go on
        return False


def refusal(error: BaseException) -> RequestError | None:
    """The 4xx a pipeline error means for the client (None: a server fault)."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, UserError):
        return RequestError(400, str(error).strip().splitlines()[0] if str(error).strip() else "bad request")
    return None
