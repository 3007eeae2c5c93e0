"""`vidsparse serve`: the OpenAI chat-completions endpoint in front of a loaded model, with a clip
cache so that questions about a clip already seen pay only for their own rows.

    chat.py       the request body -> a typed ChatRequest (or a RequestError: status + one line)
    media.py      a request's video (a video_url, or frames as image parts) -> bytes/frames + content hash
    clip_cache.py the least-recently-used, byte-bounded store of decoded clips and their shared work
    scheduler.py  one inference thread, a bounded queue, requests joining one running decoding
    telemetry.py  the Prometheus counters behind /metrics
    app.py        the ASGI app (FastAPI): routes, auth, errors, streaming
"""
