"""One inference thread behind a bounded queue. The model runs one piece of work at a time (torch
already spreads one forward over the cores); what the scheduler adds is sharing. Every request joins
one running decoding (`Answering`): between two decoding steps the waiting requests are admitted (up
to DECODING_QUESTIONS in the decoding at once), so a request never waits for others' answers to end.
Those admitted together about the same clip with the same settings go through their clip's shared
layers in one batch, and every request in the decoding, whatever its clip, is decoded in one batch
(the weights read once a step for all). A clip's shared work comes from the clip cache when an
earlier request paid for it. A request whose client went away is dropped before it costs anything."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from vidsparse.answer import AskResult
from vidsparse.errors import UserError
from vidsparse.options import DECODE_BATCH, AskOptions, resolve_positions
from vidsparse.pipeline import Answering, PreparedClip, VideoQA
from vidsparse.serve.chat import ChatRequest, RequestError
from vidsparse.serve.clip_cache import ClipCache
from vidsparse.serve.media import Media, decoded
from vidsparse.stats import HeldBytes
from vidsparse.video import DecodedVideo, decode_clip

# The longest an idle thread waits for the questions of clients just answered, and the most a running decoding
# makes a waiting request wait for others before admitting it (unless enough wait to fill it): requests
# admitted together share one prefill, whose fixed cost (a pass over the weights; on a tiny model, per-call
# overhead) several joins of one request each would pay several times. That wait is also at most what the
# last join's prefill took: waiting longer than the prefill it could save costs more than it saves (on
# shapes-demo a join takes ~3 ms).
MAX_GATHER_S = 0.02
DECODING_QUESTIONS = DECODE_BATCH  # requests decoded together at most
# The question a clip is prepared with: it only shows the prompt's layout (any question gives the same
# head), and, unlike a request's own, it is never refused for its text: a refused request fails alone.
LAYOUT_QUESTION = "what happens ?"


class QueueFull(Exception):
    """The queue holds as many requests as it may: the client should retry later (429)."""


@dataclass(frozen=True)
class Answered:
    """A request's result, and whether its clip's shared work came from the cache (or the decoding)."""

    result: AskResult
    cache_hit: bool


@dataclass
class Job:
    request: ChatRequest
    media: Media
    future: Future  # Answered, or the exception that refused the request
    on_token: Callable[[int], bool]  # each token of its answer as it is decoded; False ends the answer there
    queued: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple:
        """The requests that share a prepared clip: the same clip and settings, whatever their answers' length."""
        return self.media.digest, replace(self.request.options, max_new_tokens=0)


@dataclass
class _Admitted:
    """Requests about one clip with one setting (answers of any length), the clip prepared for them, and
    whether it came from the cache."""

    jobs: list[Job]
    clip: PreparedClip
    hit: bool
    key: tuple  # the clip's, in the cache

    @property
    def answered(self) -> bool:
        return all(job.future.done() for job in self.jobs)


class Scheduler:
    """Jobs in, answers out through each job's future; `close` drains the queue and stops."""

    def __init__(self, qa: VideoQA, cache: ClipCache, max_queue: int, max_video_seconds: float):
        self.qa, self.cache, self.max_queue = qa, cache, max_queue
        self.max_video_seconds = max_video_seconds
        self._jobs: deque[Job] = deque()
        self._taken: list[list[Job]] = []  # groups taken from the queue, waiting for room in the decoding
        self._prepared: _Admitted | None = None  # a group whose clip would not fit beside those decoding
        self._decoding: list[_Admitted] = []  # the groups admitted to the decoding (their clips held)
        # by key, the newest copy of each clip the decoding holds (counting every question asked of it)
        self._held: dict[tuple, PreparedClip] = {}
        self._in_flight, self._last_seconds = 1, 0.0  # as the decoding last ended: requests in flight, its time
        self._join_seconds = MAX_GATHER_S  # how long the last join that added questions took (their prefill)
        self._busy_since = 0.0
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="vidsparse-inference", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting those being prepared or decoded)."""
        return len(self._jobs) + sum(map(len, list(self._taken)))

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

    def _run(self) -> None:
        answering = Answering(self.qa)
        while self._wait_for_work(answering.unfinished):
            try:
                self._admit(answering)
                if answering.unfinished:
                    self._step(answering)
            except Exception as e:  # noqa: BLE001 - what stops the thread's own work fails every request it holds
                self._fail_all(answering, e)

    def _wait_for_work(self, decoding: int) -> bool:
        """Whether there is work (False: closing, and nothing is left). With `decoding` questions unfinished,
        at once: the waiting requests join at the next step. Idle, it waits for a request; where fewer wait
        than were in flight when the decoding last ended, a moment more (a tenth of that decoding's time, at
        most MAX_GATHER_S) for the rest: the clients just answered are sending their next questions, and
        admitting them together prefills their rows in one batch (and, without room for two clips, decodes
        a clip's requests together)."""
        with self._ready:
            if decoding or self._prepared is not None:
                return True
            while not self._jobs and not self._taken and not self._closing:
                self._ready.wait()
            if not self._jobs and not self._taken:
                return False
            wanted = min(self._in_flight, DECODING_QUESTIONS)
            deadline = time.monotonic() + min(MAX_GATHER_S, self._last_seconds / 10)
            while (len(self._jobs) + sum(map(len, self._taken)) < wanted and not self._closing
                   and (left := deadline - time.monotonic()) > 0):
                self._ready.wait(left)
            return True

    def _take(self, room: int) -> list[list[Job]]:
        """The groups taken before (the oldest), then the oldest waiting jobs, as many as make `room`, grouped
        by clip and settings (in the order of each group's oldest): a waiting request joins a taken group
        of its clip and settings."""
        groups = {jobs[0].group: jobs for jobs in self._taken}
        with self._ready:
            for _ in range(min(len(self._jobs), room - sum(map(len, self._taken)))):
                job = self._jobs.popleft()
                groups.setdefault(job.group, []).append(job)
        return list(groups.values())

    def _due(self, decoding: int) -> bool:
        """Whether the waiting requests join the running decoding (of `decoding` questions) at this step: once
        the oldest has waited as long as the last join took (at most MAX_GATHER_S), or when enough wait to
        fill the decoding."""
        with self._ready:
            return bool(self._jobs) and (len(self._jobs) >= DECODING_QUESTIONS - decoding
                                         or time.monotonic() - self._jobs[0].queued >= min(MAX_GATHER_S,
                                                                                          self._join_seconds))

    def _admit(self, answering: Answering) -> None:
        """Waiting requests joined to the decoding, their clips prepared (or taken from the cache), as far as
        there is room: at most DECODING_QUESTIONS in the decoding, and the clips it holds within the cache's
        budget. A clip that would take them past it waits, prepared, until enough of the decoding's answers
        have ended (or alone, when nothing decodes), and no more clips are prepared while the held clips fill
        the budget (without a cache, one clip at a time). So the decoding holds at most the budget, plus the
        clip just prepared, beside the cache. A group whose clip or options are refused fails alone."""
        budget, busy = self.cache.max_bytes, answering.unfinished > 0
        self._let_go()
        if busy and self._prepared is None and not self._taken and not self._due(answering.unfinished):
            return
        held = HeldBytes()  # the decoding's clips
        for group in self._decoding:
            held.add(group.clip)
        ready: list[_Admitted] = []
        if self._prepared is not None:
            if busy and not held.fits(self._prepared.clip, budget):
                return  # still no room: the decoding goes on
            ready.append(self._prepared)
            held.add(self._prepared.clip)
            self._prepared = None
        room = DECODING_QUESTIONS - answering.unfinished - sum(len(group.jobs) for group in ready)
        self._taken = self._take(room)
        while self._taken:
            jobs = self._taken[0]
            key = self._clip_key(jobs[0])
            # full: the rest wait for room (a clip the decoding holds already adds nothing to the budget)
            if (busy or ready) and (len(jobs) > room or (held.total >= budget and key not in self._held)):
                break
            self._taken.pop(0)
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                clip, hit = self._clip(live, key)
            except Exception as e:  # noqa: BLE001 - what stops a clip (its video, its options) fails its jobs
                _settle(live, [e] * len(live))
                continue
            group = _Admitted(live, clip, hit, key)
            if (busy or ready) and not held.fits(clip, budget):
                self._prepared = group
                break
            ready.append(group)
            held.add(clip)
            room -= len(live)
        if ready:
            self._join(answering, ready)

    def _join(self, answering: Answering, ready: list[_Admitted]) -> None:
        """The groups' questions prefilled and added to the decoding; each job's future settled as soon as
        its answer is (a refused question at once; what fails their prefill fails them only)."""
        if not answering.unfinished:
            self._busy_since = time.monotonic()
        asked, owners = [], []  # a group's jobs by answer length: one clip each to `join`; (its jobs, cache hit)
        for group in ready:
            lengths: dict[int, list[Job]] = {}
            for job in group.jobs:
                lengths.setdefault(job.request.options.max_new_tokens, []).append(job)
            for length, jobs in lengths.items():
                asked.append((group.clip.answering(length), [job.request.question for job in jobs]))
                owners.append((jobs, group.hit))

        # The hooks hold the jobs only: a clip is let go as soon as its own questions are answered.
        def answer(c: int, i: int, result: AskResult | Exception) -> None:
            jobs, hit = owners[c]
            _settle([jobs[i]], [result if isinstance(result, Exception) else Answered(result, hit)])

        self._decoding += ready
        self._held |= {group.key: group.clip for group in ready}
        start, before = time.monotonic(), answering.unfinished
        try:
            answering.join(asked, answer, lambda c, i, token: _going_on(owners[c][0][i], token))
        except Exception as e:  # noqa: BLE001 - what fails their prefill fails their jobs; the decoding goes on
            for group in ready:
                _settle(group.jobs, [e] * len(group.jobs))
        if answering.unfinished > before:  # a join of refused questions alone prefilled nothing: no measure
            self._join_seconds = time.monotonic() - start

    def _step(self, answering: Answering) -> None:
        """One decoding step; as the decoding ends, the requests in flight then (its last step's and those
        waiting) and how long it ran, for the next one's wait (`_wait_for_work`)."""
        decoding = answering.unfinished
        answering.step()
        self._let_go()
        if not answering.unfinished:
            with self._ready:
                self._in_flight = decoding + len(self._jobs)
                self._last_seconds = time.monotonic() - self._busy_since

    def _fail_all(self, answering: Answering, error: Exception) -> None:
        """Every request the thread holds (decoding, prepared, taken) gets `error`; the decoding starts afresh."""
        answering.abandon(error)
        held = [group.jobs for group in self._decoding]
        held += [[job for job in jobs if job.future.set_running_or_notify_cancel()] for jobs in self._taken]
        if self._prepared is not None:
            held.append(self._prepared.jobs)
        for jobs in held:
            _settle(jobs, [error] * len(jobs))
        self._decoding, self._taken, self._prepared, self._held = [], [], None, {}

    def _clip_key(self, job: Job) -> tuple:
        """The cache's key for the clip of a job's group: the clip and its settings (`authors` positions and
        the mode they resolve to for this model are one setting)."""
        options = job.request.options
        positions = resolve_positions(options.positions, options.method, self.qa.model.position_dims)
        return "clip", job.media.digest, replace(options, max_new_tokens=0, positions=positions)

    def _let_go(self) -> None:
        """The answered groups, and the clips no group in the decoding holds any more."""
        self._decoding = [group for group in self._decoding if not group.answered]
        keys = {group.key for group in self._decoding}
        self._held = {key: clip for key, clip in self._held.items() if key in keys}

    def _clip(self, jobs: list[Job], key: tuple) -> tuple[PreparedClip, bool]:
        """The jobs' clip prepared for their options (checked with their shortest answer: each question's
        own length is checked as it joins), counted as asked their questions, and whether it came from
        the cache or the decoding."""
        options: AskOptions = replace(jobs[0].request.options,
                                      max_new_tokens=min(job.request.options.max_new_tokens for job in jobs))
        self.qa.check_options(options)
        clip = self.cache.get(key) or self._held.get(key)  # the decoding's: shared even without the cache
        hit = clip is not None
        if clip is None:
            clip = self.qa.prepare_clip(self._video(jobs[0].media, options), LAYOUT_QUESTION, options,
                                        jobs[0].media.label)
        clip: PreparedClip = clip.asked(len(jobs))
        self.cache.put(key, clip)
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


def _settle(jobs: list[Job], answers: list[Answered | Exception]) -> None:
    """Each job's future gets its answer or error, unless it has one already."""
    for job, answer in zip(jobs, answers, strict=True):
        if job.future.done():
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
