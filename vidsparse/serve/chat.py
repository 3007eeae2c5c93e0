"""An OpenAI chat-completions request body, checked once into a typed `ChatRequest`.

vidsparse answers one question about one clip, so a request is one user message (system messages are
read past) whose content holds the question as text parts and the clip as one `video_url` part or as
frames (`image_url` parts, before or after the text, as lmms-eval sends them). Top-level keys this
server does not know are ignored, as OpenAI-compatible servers do; a key it knows with a bad value is
a 400 with one line. Per-request pruning comes in the `vidsparse` object (the OpenAI client's
`extra_body`), checked by the same parser as the CLI's flags.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vidsparse.errors import UserError
from vidsparse.options import AskOptions, ask_options, parse_method

MAX_STOPS = 4  # as OpenAI's API


class RequestError(Exception):
    """A request the server refuses: its HTTP status, one line, and OpenAI's error type/param."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def __reduce__(self):  # crosses to the Ray Serve front whole (Exception pickles its message only)
        return RequestError, (self.status, self.message, self.param, self.kind)


@dataclass(frozen=True)
class MediaRef:
    """Where a clip comes from: one video URL, or frames (image URLs, in order)."""

    video: str | None
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    model: str
    question: str
    media: MediaRef
    options: AskOptions
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param)


def _int(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise _bad(f"{key} must be {bound}, got {value!r}", key)
    return value


def _content_parts(message: dict, index: int) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise _bad(f"messages[{index}].content must be a string or a list of content parts", "messages")
    return content


def _url(part: dict, kind: str, index: int) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise _bad(f"messages[{index}]: a {kind} part needs {{\"{kind}\": {{\"url\": ...}}}}", "messages")
    return url


def question_and_media(messages: Any) -> tuple[str, MediaRef]:
    """The question (text parts joined) and the clip of the one user message."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _bad("messages must be a non-empty list of message objects", "messages")
    turns = [(i, m) for i, m in enumerate(messages) if m.get("role") != "system"]
    if len(turns) != 1 or turns[0][1].get("role") != "user":
        raise _bad("vidsparse answers one question about one clip: send one user message "
                   "(with a system message at most)", "messages")
    index, message = turns[0]
    texts, videos, images = [], [], []
    for part in _content_parts(message, index):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}]: a text part needs a string \"text\"", "messages")
            texts.append(part["text"].strip())
        elif kind == "video_url":
            videos.append(_url(part, kind, index))
        elif kind == "image_url":
            images.append(_url(part, kind, index))
        else:
            raise _bad(f"messages[{index}]: unsupported content part type {kind!r} "
                       "(text, video_url, image_url)", "messages")
    question = " ".join(t for t in texts if t)
    if not question:
        raise _bad("the user message has no question text", "messages")
    if len(videos) + bool(images) != 1:
        raise _bad("send the clip as one video_url part or as image_url frames (not both, not none)", "messages")
    return question, MediaRef(videos[0] if videos else None, tuple(images))


# The `vidsparse` object's keys (the CLI's option names) and the JSON types each may have.
VIDSPARSE_KEYS = {"method": (str,), "budget": (str, int), "prune_after": (str, int, list), "positions": (str,),
                  "min_per_frame": (int,), "seed": (int,), "frames": (int,), "fps": (int, float),
                  "max_frames": (int,), "tower_cut": (int,)}
NULLABLE_KEYS = frozenset({"prune_after", "tower_cut"})  # null: not set (the method's stages, the whole tower)


def _typed(block: dict) -> None:
    """Refuse a value of the wrong JSON type (a bool is not a number here, a layer is an integer)."""
    for key, value in block.items():
        if value is None and key in NULLABLE_KEYS:
            continue
        kinds = VIDSPARSE_KEYS[key]
        wrong = isinstance(value, bool) or not isinstance(value, kinds) or (
            isinstance(value, list) and not all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if wrong:
            names = {str: "a string", int: "an integer", float: "a number", list: "a list of integers"}
            raise _bad(f"vidsparse.{key} must be {' or '.join(names[k] for k in kinds)}, got {value!r}"[:200],
                       "vidsparse")


def request_options(block: Any, defaults: AskOptions, media_frames: int | None) -> AskOptions:
    """The server's defaults with the request's `vidsparse` object applied, checked by the CLI's own parser
    (`ask_options`, `check_method`), so a request may ask what a command line may and nothing else. Its
    sampling replaces the defaults' as a whole; a frame count the client's media settings ask for (e.g.
    lmms-eval's `media_io_kwargs`) applies where the object names no sampling."""
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise _bad("vidsparse must be an object, e.g. {\"method\": \"stprune\", \"budget\": \"10%\"}", "vidsparse")
    unknown = sorted(set(block) - set(VIDSPARSE_KEYS))
    if unknown:
        raise _bad(f"unknown vidsparse option {unknown[0][:40]!r}: choose from {', '.join(VIDSPARSE_KEYS)}",
                   "vidsparse")
    _typed(block)
    sampling = {"num_frames": defaults.num_frames if defaults.fps is None else None, "fps": defaults.fps,
                "max_frames": defaults.max_frames}
    if {"frames", "fps"} & set(block) or (media_frames is not None and "max_frames" not in block):
        sampling = {"num_frames": block.get("frames", None if "fps" in block else media_frames),
                    "fps": block.get("fps"), "max_frames": block.get("max_frames")}
    elif "max_frames" in block:
        sampling["max_frames"] = block["max_frames"]
    try:
        from vidsparse.pruning import METHODS, check_method

        method = parse_method(block.get("method", defaults.method))
        # The server's --prune-after is its method's stages: a request naming another method does not
        # inherit it. Its --tower-cut (a tower layer) goes to every method that takes one. A request may
        # set either itself, or null for none.
        options = ask_options(method, block.get("budget", defaults.budget),
                              block.get("prune_after", defaults.prune_after if method == defaults.method else None),
                              block.get("positions", defaults.positions),
                              block.get("min_per_frame", defaults.min_per_frame), block.get("seed", defaults.seed),
                              sampling["num_frames"], defaults.backend, defaults.max_new_tokens,
                              None if sampling["fps"] is None else float(sampling["fps"]), sampling["max_frames"],
                              block.get("tower_cut", defaults.tower_cut if METHODS[method].chooses_by_layout else None))
        check_method(options.method, options.prune_after, tower_cut=options.tower_cut)
    except UserError as e:
        raise _bad(f"vidsparse: {e}"[:300], "vidsparse") from None
    return options


def _media_frames(body: dict) -> int | None:
    """`media_io_kwargs.video.num_frames` (vLLM's and lmms-eval's way of asking for a frame count)."""
    kwargs = body.get("media_io_kwargs")
    video = kwargs.get("video") if isinstance(kwargs, dict) else None
    frames = video.get("num_frames") if isinstance(video, dict) else None
    return frames if isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1 else None


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return tuple(stops)


def parse_chat(body: Any, defaults: AskOptions, max_tokens_limit: int) -> ChatRequest:
    """The request, checked: every mistake a client can make is a RequestError with one line."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (GET /v1/models lists it)", "model")
    question, media = question_and_media(body.get("messages"))
    _int(body, "n", 1, 1)  # one answer a request
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)
                                    or temperature < 0):
        raise _bad(f"temperature must be a number >= 0, got {temperature!r}", "temperature")
    if temperature:
        raise _bad("vidsparse decodes greedily (the answers pruning is measured on): send temperature 0",
                   "temperature")
    asked = [_int(body, key, 1) for key in ("max_completion_tokens", "max_tokens")]
    wanted = next((v for v in asked if v is not None), defaults.max_new_tokens)
    options = replace(request_options(body.get("vidsparse"), defaults, _media_frames(body)),
                      max_new_tokens=min(wanted, max_tokens_limit))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return ChatRequest(model, question, media, options, _stops(body.get("stop")), stream,
                       bool(stream_options.get("include_usage")))
