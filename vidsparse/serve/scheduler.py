"""One inference thread behind a bounded queue. The model runs one piece of work at a time (torch
already spreads one forward over the cores); what the scheduler adds is sharing. A *round* takes the
oldest waiting requests (up to ROUND_QUESTIONS) and answers them in one `answer_together` call: the
requests about the same clip with the same settings go through their clip's shared layers in one
batch, and every request of the round, whatever its clip, is decoded in one batch (the weights read
once a step for all). A clip's shared work comes from the clip cache when an earlier request paid for
it. A request whose client went away is dropped before it costs anything."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

from vidsparse.answer import AskResult
from vidsparse.errors import UserError
from vidsparse.options import DECODE_BATCH, AskOptions, resolve_positions
from vidsparse.pipeline import PreparedClip, VideoQA
from vidsparse.serve.chat import ChatRequest, RequestError
from vidsparse.serve.clip_cache import ClipCache
from vidsparse.serve.media import Media, decoded
from vidsparse.stats import nbytes
from vidsparse.video import DecodedVideo, decode_clip

MAX_GATHER_S = 0.02  # the longest a round waits for the questions of clients just answered
ROUND_QUESTIONS = DECODE_BATCH  # requests answered (and decoded) together at most
# The question a clip is prepared with: it only shows the prompt's layout (any question gives the same
# head), and, unlike a request's own, it is never refused for its text: a refused request fails alone.
LAYOUT_QUESTION = "what happens ?"


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

    def _next_round(self) -> list[list[Job]] | None:
        """The oldest waiting jobs, up to ROUND_QUESTIONS, grouped by clip and settings (in the order of
        each group's oldest). Where fewer wait than were in flight when the last round ended (that round's
        and those waiting then), it waits a moment (a tenth of that round's time, at most MAX_GATHER_S)
        for the rest: the clients just answered are sending their next questions, and without it a closed
        loop of N clients settles into small rounds (N - 1 and 1, or N/2 and N/2) instead of one of N."""
        with self._ready:
            while not self._jobs and not self._closing:
                self._ready.wait()
            if not self._jobs:
                return None
            wanted = min(self._in_flight, ROUND_QUESTIONS)
            deadline = time.monotonic() + min(MAX_GATHER_S, self._last_seconds / 10)
            while (len(self._jobs) < wanted and not self._closing
                   and (left := deadline - time.monotonic()) > 0):
                self._ready.wait(left)
            groups: dict[tuple, list[Job]] = {}
            for _ in range(min(len(self._jobs), ROUND_QUESTIONS)):
                job = self._jobs.popleft()
                groups.setdefault(job.group, []).append(job)
        return list(groups.values())

    def _run(self) -> None:
        while (groups := self._next_round()) is not None:
            live = [[job for job in group if job.future.set_running_or_notify_cancel()] for group in groups]
            live = [group for group in live if group]
            if not live:
                continue
            start = time.monotonic()
            try:
                self._answer(live)
            except Exception as e:  # noqa: BLE001 - what stops the whole round fails each of its jobs not answered
                for group in live:
                    _settle(group, [e] * len(group), only_pending=True)
            finally:
                with self._ready:
                    self._in_flight = sum(map(len, live)) + len(self._jobs)
                    self._last_seconds = time.monotonic() - start

    def _answer(self, groups: list[list[Job]]) -> None:
        """Each group's clip prepared (or taken from the cache), then the groups' questions answered
        together, each group's futures settled as soon as its batch is answered. A group whose clip or
        options are refused fails alone; what fails a decoding batch fails the groups in it. The clips
        held for one batch stay within the cache's budget: a clip that would take them past it goes to
        the next batch, and a batch that reaches the budget is decoded before the next clip is prepared
        (a clip as large as the budget, alone; without a cache, one clip a batch). So a round holds at
        most the budget, plus the clip just prepared, beside the cache."""
        ready: list[tuple[list[Job], PreparedClip, bool]] = []  # (jobs, their clip, cache hit), not yet answered
        held, storages = 0, set()  # their bytes, each storage once (two groups' clips may share a video)
        for jobs in groups:
            try:
                clip, hit = self._clip(jobs)
            except Exception as e:  # noqa: BLE001 - what stops a clip (its video, its options) fails its jobs
                _settle(jobs, [e] * len(jobs))
                continue
            if ready and held + nbytes(clip, set(storages)) > self.cache.max_bytes:
                self._answer_ready(ready)
                ready, held, storages = [], 0, set()
            ready.append((jobs, clip, hit))
            held += nbytes(clip, storages)
            if held >= self.cache.max_bytes:  # full: decoded before the next clip is prepared
                self._answer_ready(ready)
                ready, held, storages = [], 0, set()
        if ready:
            self._answer_ready(ready)

    def _answer_ready(self, ready: list[tuple[list[Job], PreparedClip, bool]]) -> None:
        """The questions of the groups whose clips are `ready`, decoded in one batch, their futures settled
        (what fails the batch fails its groups only)."""
        asked = [(clip.answering(jobs[0].request.options.max_new_tokens), [job.request.question for job in jobs])
                 for jobs, clip, _ in ready]
        try:
            results = self.qa.answer_together(asked, on_token=lambda c, i, token: _going_on(ready[c][0][i], token))
        except Exception as e:  # noqa: BLE001 - the batch's failure is its groups'; earlier batches' answers stand
            results = [[e] * len(jobs) for jobs, _, _ in ready]
        for (jobs, _, hit), mine in zip(ready, results, strict=True):
            _settle(jobs, [r if isinstance(r, Exception) else Answered(r, hit) for r in mine])

    def _clip(self, jobs: list[Job]) -> tuple[PreparedClip, bool]:
        """The jobs' clip prepared for their options, counted as asked their questions, and whether it came
        from the cache."""
        options: AskOptions = jobs[0].request.options
        media = jobs[0].media
        self.qa.check_options(options)
        # `authors` positions and the mode they resolve to for this model are one setting: one entry
        positions = resolve_positions(options.positions, options.method, self.qa.model.position_dims)
        clip_key = ("clip", media.digest, replace(options, max_new_tokens=0, positions=positions))
        clip = self.cache.get(clip_key)
        hit = clip is not None
        if clip is None:
            clip = self.qa.prepare_clip(self._video(media, options), LAYOUT_QUESTION, options, media.label)
        clip: PreparedClip = clip.asked(len(jobs))
        self.cache.put(clip_key, clip)
        return clip, hit

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


def _settle(jobs: list[Job], answers: list[Answered | Exception], only_pending: bool = False) -> None:
    """Each job's future gets its answer or error (`only_pending`: those not settled yet)."""
    for job, answer in zip(jobs, answers, strict=True):
        if only_pending and job.future.done():
            continue
        if isinstance(answer, Exception):
            job.future.set_exception(answer)
        else:
            job.future.set_result(answer)


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
