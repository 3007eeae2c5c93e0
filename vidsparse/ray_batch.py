"""`vidsparse batch --ray`: the batch's clips answered by Ray actors, on one machine or a cluster.

Why Ray and not a home-made pool: it already starts processes on every node, places them on GPUs,
ships arguments and results, and tells the driver when a process dies. What vidsparse adds is the
contract of the single-process batch, kept whole:

- the unit of work is a clip with all its questions (``batch.clip_answers`` on the worker), so a
  clip is decoded, run through the vision tower and prefilled once, as without Ray; the driver
  sends paths and question texts, never frames, and gets back JSON records;
- the driver is the only writer of the results file (``results.ResultsFile``: lock, settings check,
  one fsynced append per answer, resume by id), and the settings are the workers' own (``--dtype
  auto`` is decided where the model runs);
- at most ``IN_FLIGHT`` clips are queued on a worker (backpressure: the rest wait on the driver);
- a worker that dies (killed, out of memory) is replaced and its clips go back to the queue, each
  clip at most ``MAX_ATTEMPTS`` times before its questions get an error record; a clip's records are
  written only once it is answered, so nothing is lost or written twice, and a killed driver is
  resumed by running the same command again.

Ray is imported only here, and only for ``--ray``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidsparse.errors import UserError, first_line
from vidsparse.options import AskOptions
from vidsparse.results import ResultsFile

if TYPE_CHECKING:  # batch imports the model's modules: a driver loads them only where it answers
    from vidsparse.batch import ClipJob
    from vidsparse.metrics import Tally

IN_FLIGHT = 2  # clips on a worker at once: one answered while the next decodes (and none waits on the driver)
MAX_ATTEMPTS = 3  # a clip whose worker died this many times is recorded as an error
LOCAL = "local"  # --ray without an address: start a Ray instance on this machine


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'vidsparse[ray]' "
                        "(from a clone: pip install -e '.[ray]')") from None
    return ray


class ClipWorker:
    """A Ray actor holding one loaded model; answers whole clips (decoded here, on its own node)."""

    def __init__(self, model: str, dtype: str, device: str, index: int, threads: int):
        import torch

        from vidsparse.pipeline import load_quietly

        torch.set_num_threads(threads)
        self.model, self.dtype, self.device = model, dtype, device
        self.info = {"index": index, "host": socket.gethostname(), "pid": os.getpid()}
        self.failure: str | None = None
        self.model_lock = threading.Lock()  # clips decode concurrently; one at a time uses the model
        try:
            self.qa = load_quietly(model, dtype, device)
        except UserError as e:  # reported by settings(), as one line on the driver
            self.failure = str(e)

    def settings(self, options: AskOptions, question: str | None = None) -> dict[str, Any] | str:
        """The results file's settings as this worker resolves them, or why it cannot answer (`question`:
        the --question asked of every clip, checked here once, as the driver holds no tokenizer)."""
        from vidsparse.batch import batch_settings

        if self.failure is not None:
            return self.failure
        try:
            self.qa.check_options(options)
            if question is not None:
                self.qa.check_question(question, options)
            return batch_settings(self.model, self.dtype, self.device, options)
        except UserError as e:
            return str(e)

    def answer(self, path: str, questions: list[str], options: AskOptions,
               decode_batch: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Each question's answer fields (``batch.answer_fields``), and who answered. Up to
        ``IN_FLIGHT`` calls run at once (a threaded actor): the next clip decodes while this one is
        answered, as the single-process batch prefetches."""
        from vidsparse.batch import answer_fields, clip_answers
        from vidsparse.video import decode_clip

        try:
            video = decode_clip(Path(path), options)
        except UserError as e:
            video = e
        with self.model_lock:
            results = clip_answers(self.qa, video, questions, options, decode_batch)
            return [answer_fields(r, Path(path)) for r in results], self.info


@dataclass(frozen=True)
class Placement:
    """How many workers, and what each one asks Ray for."""

    workers: int
    gpus: int  # per worker: 1, or 0 for CPU workers
    cpus: float  # per worker
    threads: int  # torch threads per worker


def placement(resources: dict[str, float], workers: int | None, device: str) -> Placement:
    """One worker per GPU where the cluster has GPUs (unless --device cpu), else ``workers`` (default
    1) CPU workers sharing the cluster's cores."""
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1.0)
    if gpus and device != "cpu":
        if workers is not None and workers > gpus:
            raise UserError(f"--workers {workers} but the Ray cluster has {gpus} GPU(s): one worker per GPU")
        return Placement(workers or gpus, 1, 1.0, 1)
    n = workers or 1
    share = cpus / n
    return Placement(n, 0, float(int(share)) if share >= 1 else share, max(1, int(share)))


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address where nothing listens: Ray itself retries for minutes, printing a
    warning every few seconds, before it gives up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: expected 'auto' or HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"cannot connect to the Ray cluster at {address}: nothing answers at {host}:{port} "
                        f"({reason}); is the cluster's head running there?") from None


def join_ray(address: str, **init) -> tuple[Any, bool]:
    """(ray, whether this call started it): join the cluster at ``address`` (``auto``, ``ray://host:port``),
    or start Ray on this machine (``LOCAL``), unless this process already runs Ray. A cluster that cannot
    be reached or refuses us is one line."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        if address not in (LOCAL, "auto"):
            check_reachable(address)
        quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False, **init}
        try:
            if address == LOCAL:
                ray.init(**quiet)
            else:
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            unauthenticated = address != LOCAL and os.environ.get("RAY_AUTH_MODE") != "token"
            hint = ("; if the cluster uses token authentication (Ray >= 2.59 does by default), set RAY_AUTH_MODE="
                    "token here, with the cluster's token (ray get-auth-token)") if unauthenticated else ""
            reason = first_line(e, with_type=False)
            raise UserError(f"cannot connect to the Ray cluster at {address}: {reason}{hint}") from None
    return ray, started


def portable_model(model: str) -> str:
    """A local checkpoint's absolute path: Ray's processes need not share this one's working directory."""
    from vidsparse.models.loading import ALIASES

    return str(Path(model).resolve()) if model not in ALIASES and Path(model).exists() else model


class WorkerPool:
    """The Ray actors of one batch run, and the scheduler that feeds them clips."""

    def __init__(self, ray, started: bool, model: str, dtype: str, device: str, place: Placement):
        self.ray, self.started = ray, started
        self.args = (model, dtype, device)
        self.place = place
        self.remote_class = ray.remote(ClipWorker)
        self.actors: dict[int, Any] = {}
        self.spawned = 0
        for _ in range(place.workers):
            self._spawn()

    @classmethod
    def start(cls, address: str, workers: int | None, model: str, dtype: str, device: str) -> WorkerPool:
        """Join the cluster at ``address`` (``auto``, ``ray://host:port``), or start Ray on this machine
        (``LOCAL``), unless this process already runs Ray; then start the workers."""
        ray, started = join_ray(address)
        return cls(ray, started, portable_model(model), dtype, device,
                   placement(ray.cluster_resources(), workers, device))

    def _spawn(self) -> None:
        index, self.spawned = self.spawned, self.spawned + 1
        actor = self.remote_class.options(num_cpus=self.place.cpus, num_gpus=self.place.gpus,
                                          max_concurrency=IN_FLIGHT, scheduling_strategy="SPREAD")
        self.actors[index] = actor.remote(*self.args, index, self.place.threads)

    def _replace(self, index: int) -> None:
        """A dead worker's place goes to a new one (which loads the model again)."""
        if self.actors.pop(index, None) is not None:
            self._spawn()

    def settings(self, options: AskOptions, question: str | None = None) -> dict[str, Any]:
        """The settings every worker resolves (they must agree: one results file, one dtype); a
        --question (`question`) that cannot be asked is refused here, before any clip is sent."""
        try:
            found = self.ray.get([actor.settings.remote(options, question) for actor in self.actors.values()])
        except self.ray.exceptions.RayActorError as e:
            raise UserError(f"a Ray worker could not start: {first_line(e, with_type=False)}") from None
        for answer in found:
            if isinstance(answer, str):
                raise UserError(answer)
        if any(s != found[0] for s in found):
            differ = sorted({k for s in found for k, v in s.items() if v != found[0].get(k)})
            hint = ("the machines hold different weights under that model name: give every worker the same "
                    "checkpoint" if "weights" in differ else "give --dtype explicitly, or use workers of one kind")
            raise UserError(f"the Ray workers resolve different settings ({', '.join(differ)}): {hint}")
        return found[0]

    def run(self, jobs: Iterator[ClipJob], root: Path, results: ResultsFile, options: AskOptions, tally: Tally,
            on_progress: Callable[[], None], decode_batch: int) -> None:
        """Answer each job's questions, a clip a task, writing each clip's records once it is answered.
        Jobs are taken from `jobs` only when a worker has room: a long questions file is never held."""
        from vidsparse.batch import write_answers

        ray = self.ray
        retried: deque[ClipJob] = deque()  # clips whose worker died: sent again before new ones
        mistake: list[UserError] = []  # one found reading `jobs` (a bad line): raised once the clips sent are in

        def take() -> ClipJob | None:
            if retried:
                return retried.popleft()
            if mistake:
                return None
            try:
                return next(jobs, None)  # None again and again once `jobs` ends
            except UserError as e:
                mistake.append(e)
                return None

        in_flight: dict[Any, tuple[int, ClipJob]] = {}
        load = dict.fromkeys(self.actors, 0)
        while True:
            for index, actor in self.actors.items():
                while load.setdefault(index, 0) < IN_FLIGHT and (job := take()) is not None:
                    job.attempts += 1
                    ref = actor.answer.remote(str(job.path.absolute()), [q.question for q in job.questions],
                                              options, decode_batch)
                    in_flight[ref] = (index, job)
                    load[index] += 1
            if not in_flight:  # every worker had room and nothing was left to send
                if mistake:
                    raise mistake[0]
                return
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, job = in_flight.pop(ref)
            load[index] -= 1
            try:
                fields, worker = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.OutOfMemoryError) as e:
                self._replace(index)
                if job.attempts < MAX_ATTEMPTS:
                    retried.append(job)
                    continue
                fields = [{"error": f"a worker died answering this clip, {job.attempts} attempt(s) in all "
                                    f"({first_line(e, with_type=False)})"}]
                fields, worker = fields * len(job.questions), None
            except ray.exceptions.RayTaskError as e:
                fields = [{"error": f"unexpected {type(e.cause).__name__}: {e.cause}"}] * len(job.questions)
                worker = None
            write_answers(job, fields, root, results, tally, on_progress,
                          {"worker": None if worker is None else worker | {"attempt": job.attempts}})

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
        if self.started:
            self.ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
