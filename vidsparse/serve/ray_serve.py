"""`vidsparse serve --ray`: the same app on Ray Serve.

Two deployments in one Ray Serve application:
- `VidsparseFront` (the HTTP ingress, no model): the app of `serve.app` (every check, auth, limits,
  errors, streaming, metrics) over a `RayBackend`, which sends each checked request to a replica;
- `VidsparseReplica` (one per GPU, or N on CPUs): a loaded model with its own scheduler and clip cache.
Requests about the same clip go to the replica that answered it before where Ray Serve allows it: the
clip's content hash is the request's multiplexed model id, and Ray Serve routes an id to a replica that
has "loaded" it (the replica's cache holds its shared work). The media crosses to the replica by value,
so replicas need not see the front's files.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from vidsparse.errors import UserError, first_line
from vidsparse.serve.app import ServeSettings, create_app
from vidsparse.serve.backend import Completion, Gone, LocalBackend, finished_unless_gone, pieces_then_result
from vidsparse.serve.chat import ChatRequest
from vidsparse.serve.feed import Send
from vidsparse.serve.media import Media
from vidsparse.serve.scheduler import QueueFull

APP_NAME = "vidsparse"
CLIPS_PER_REPLICA = 256  # clip ids a replica is known to hold, for routing (its cache holds what fits)


class Replica:
    """One loaded model with its own scheduler and clip cache."""

    def __init__(self, model: str, dtype: str, device: str, settings: ServeSettings, threads: int):
        import torch

        from vidsparse.pipeline import load_quietly

        torch.set_num_threads(threads)
        self.backend = LocalBackend(load_quietly(model, dtype, device), settings.cache_bytes, settings.max_queue,
                                    settings.max_video_seconds, settings.request_timeout_s)
        self.backend.start()

    async def clip(self, digest: str) -> str:
        """Ray Serve's multiplexed "model" of a request: its clip, whose work this replica's cache keeps."""
        return digest

    async def complete(self, chat: ChatRequest, media: Media) -> Completion:
        from ray import serve

        await self.clip(serve.get_multiplexed_model_id())
        return await self.backend.complete(chat, media)

    async def stream(self, chat: ChatRequest, media: Media):
        """The answer's text pieces as they are decoded, then its Completion (a streaming response)."""
        from ray import serve

        await self.clip(serve.get_multiplexed_model_id())
        async for item in pieces_then_result(lambda send: self.backend.complete(chat, media, None, send)):
            yield item

    def __del__(self) -> None:
        self.backend.close()


class RayBackend:
    """The front's backend: each request to a replica, chosen by Ray Serve with the clip as routing key.
    Its `depth` (the metrics' queue depth) is the requests sent to replicas and not answered yet: the
    front cannot see inside a replica, so a request waiting there and one being answered count alike."""

    def __init__(self, replicas):
        self.replicas = replicas
        self.depth = 0  # changed on the event loop only: no lock

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def check_room(self) -> None:
        """Ray Serve says when every replica's queue is full, once the request is sent (BackPressureError)."""

    async def complete(self, chat: ChatRequest, media: Media, gone: Gone | None = None,
                       send: Send | None = None) -> Completion | None:
        """A replica's answer; with `send`, its text pieces relayed as the replica decodes them."""
        self.depth += 1
        try:
            return await self._complete(chat, media, gone, send)
        finally:
            self.depth -= 1

    async def _complete(self, chat: ChatRequest, media: Media, gone: Gone | None, send: Send | None,
                        ) -> Completion | None:
        from ray.serve.exceptions import BackPressureError

        replicas = self.replicas.options(multiplexed_model_id=media.digest)
        if send is None:
            response = replicas.complete.remote(chat, media.portable())
            waiting = asyncio.ensure_future(_awaited(response))
        else:
            response = replicas.options(stream=True).stream.remote(chat, media.portable())
            waiting = asyncio.ensure_future(_relayed(response, send))

        def cancel() -> None:  # the replica's work, and the task waiting for it (its error is nobody's)
            response.cancel()
            waiting.cancel()

        if not await finished_unless_gone(waiting, gone, cancel):
            return None
        try:
            return waiting.result()
        except BackPressureError:
            raise QueueFull("every replica's queue is full") from None
        except Exception as e:  # noqa: BLE001 - a replica's refusal comes wrapped: raise the refusal itself
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from None


async def _awaited(response):
    return await response


async def _relayed(pieces, send: Send) -> Completion:
    """A replica's streamed answer: each text piece to `send`, then its Completion."""
    async for item in pieces:
        if not isinstance(item, str):
            return item
        send(item)
    raise RuntimeError("the replica's stream ended without its answer")


class Front:
    """The HTTP ingress: `serve.app`'s app over the replicas (bound by Ray Serve as a handle)."""

    def __init__(self, replicas, settings: ServeSettings):
        self.http = create_app(RayBackend(replicas), settings)

    def __serve_build_asgi_app__(self):
        return self.http


def application(model: str, dtype: str, device: str, settings: ServeSettings, replicas: int, gpus: int,
                cpus: float, threads: int):
    """The Ray Serve application: the front bound to `replicas` model replicas."""
    from ray import serve

    class RoutedReplica(Replica):
        @serve.multiplexed(max_num_models_per_replica=CLIPS_PER_REPLICA)
        async def clip(self, digest: str) -> str:
            return digest

    replica = serve.deployment(
        RoutedReplica, name="VidsparseReplica", num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": cpus},
        max_ongoing_requests=settings.max_queue + 1, max_queued_requests=settings.max_queue,
    )
    front = serve.deployment(serve.ingress()(Front), name="VidsparseFront", num_replicas=1,
                             ray_actor_options={"num_cpus": 0})
    return front.bind(replica.bind(model, dtype, device, settings, threads), settings)


def run_on_ray(address: str, model: str, dtype: str, device: str, settings: ServeSettings, host: str, port: int,
               replicas: int | None) -> None:
    """Deploy on the Ray instance at `address` (or one started here) and serve until Ctrl-C / SIGTERM."""
    from vidsparse.ray_batch import join_ray, placement, portable_model

    ray, started = join_ray(address)
    try:
        from ray import serve
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'vidsparse[serve,ray]'") from None
    place = placement(ray.cluster_resources(), replicas, device)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(portable_model(model), dtype, device, settings, place.workers, place.gpus, place.cpus,
                              place.threads), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # a replica failed to start (Ray Serve has logged why)
        serve.shutdown()
        raise UserError(f"Ray Serve could not start the replicas: {first_line(e, with_type=False)}") from None
    print(f"vidsparse serve --ray: {place.workers} replica(s) of {model} at http://{host}:{port}/v1",
          file=sys.stderr)
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # SIGTERM as Ctrl-C (Ray's own handler aborts the process)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("vidsparse serve --ray: shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
