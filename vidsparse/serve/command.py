"""`vidsparse serve`'s flags, checked, then the model loaded and uvicorn started."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from vidsparse.errors import UserError
from vidsparse.options import AskOptions


@dataclass(frozen=True)
class ServeFlags:
    model: str
    dtype: str
    device: str
    options: AskOptions
    host: str
    port: int
    served_model_name: str
    api_key: str | None
    media_root: Path | None
    allow_http: bool
    cache_mb: int
    queue_size: int
    timeout_s: float
    max_body_mb: int
    max_video_seconds: float
    frame_limit: int
    ray_address: str | None = None
    replicas: int | None = None


def check_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"vidsparse serve needs the server packages ({e.name} is missing): "
                        "pip install 'vidsparse[serve]'") from None


def check_port(host: str, port: int) -> None:
    """Refuse an address that cannot be bound, in one line, before the model is loaded."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def settings_of(flags: ServeFlags):
    from vidsparse.serve.app import ServeSettings
    from vidsparse.serve.media import MediaPolicy

    root = None
    if flags.media_root is not None:
        root = flags.media_root.resolve()
        if not root.is_dir():
            raise UserError(f"--media-root {flags.media_root}: not a folder")
    if flags.api_key is not None and not flags.api_key.strip():
        raise UserError("the API key (--api-key or VIDSPARSE_API_KEY) is empty: give a key, or neither")
    limit = flags.max_body_mb * 2**20
    return ServeSettings(
        model_name=flags.served_model_name, defaults=flags.options,
        media=MediaPolicy(root, flags.allow_http, limit, max_frames=flags.frame_limit), api_key=flags.api_key,
        max_tokens=flags.options.max_new_tokens,
        max_video_seconds=flags.max_video_seconds, max_body_bytes=limit + 2**20, cache_bytes=flags.cache_mb * 2**20,
        max_queue=flags.queue_size, request_timeout_s=flags.timeout_s)


def run_server(flags: ServeFlags) -> None:
    check_server_packages()
    settings = settings_of(flags)
    check_port(flags.host, flags.port)
    if flags.ray_address is not None:
        from vidsparse.serve.ray_serve import run_on_ray

        run_on_ray(flags.ray_address, flags.model, flags.dtype, flags.device, settings, flags.host, flags.port,
                   flags.replicas)
        return
    import uvicorn

    from vidsparse.pipeline import load_quietly
    from vidsparse.serve.app import local_app

    qa = load_quietly(flags.model, flags.dtype, flags.device)
    qa.check_options(flags.options)
    print(f"vidsparse serve: {flags.served_model_name} ({qa.model.name}, {str(qa.model.dtype).removeprefix('torch.')} "
          f"on {qa.model.device}), pruning {flags.options.method}"
          f"{'' if flags.options.method == 'none' else f' to {flags.options.budget}'}, "
          f"http://{flags.host}:{flags.port}/v1{'' if settings.api_key else ' (no API key)'}", file=sys.stderr)
    try:
        uvicorn.run(local_app(qa, settings), host=flags.host, port=flags.port, log_level="warning")
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has drained the requests in flight, then raised it again
        print("vidsparse serve: stopped", file=sys.stderr)
