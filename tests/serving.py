"""A live `vidsparse serve` app for the tests: uvicorn on a free localhost port in a thread of the test
process (the model loaded once per module), and the clients that talk to it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import uvicorn

from vidsparse.options import AskOptions
from vidsparse.pipeline import VideoQA
from vidsparse.serve.app import ServeSettings, local_app
from vidsparse.serve.media import MediaPolicy

MODEL_NAME = "tiny"


def settings(media_root: Path | None, **changes) -> ServeSettings:
    base = ServeSettings(model_name=MODEL_NAME, defaults=AskOptions(max_new_tokens=4),
                         media=MediaPolicy(media_root.resolve() if media_root else None, False, 4 * 2**20),
                         max_tokens=4, max_body_bytes=6 * 2**20)
    return replace(base, **changes)


@contextmanager
def live_server(qa: VideoQA, serve_settings: ServeSettings) -> Iterator[str]:
    """The base URL (http://127.0.0.1:PORT) of the app serving `qa`, until the block ends (then it drains)."""
    server = uvicorn.Server(uvicorn.Config(local_app(qa, serve_settings), host="127.0.0.1", port=0,
                                           log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
