"""A request's clip, fetched and named by its content: the bytes of a `data:` URL, of a file under the
media root, or (opted in) of an http(s) URL, size- and time-limited; or frames sent as images.

Nothing outside the media root is ever read: the path is resolved (symlinks and `..`) before it is
compared with the root, and only then opened. The content hash, not the URL, is what the clip cache
keys on, so the same clip sent twice, by path or by value, is decoded once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import re
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vidsparse.errors import UserError
from vidsparse.serve.chat import MediaRef, RequestError
from vidsparse.video import MAX_ASPECT_RATIO, DecodedVideo

MAX_FRAME_SIDE = 4096  # an image frame's longest side (a 4K frame; the models see 224-768 px)
MAX_CLIP_PIXELS = 2**28  # all image frames of a request together: 768 MiB decoded (64 frames of 2048 x 2048)


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read: files under `root` (None: no file:// URL), http(s) URLs when
    `allow_http`, at most `max_bytes` per clip and `http_timeout_s` per download."""

    root: Path | None
    allow_http: bool
    max_bytes: int
    http_timeout_s: float = 30.0
    max_frames: int = 64  # frames a request may sample, or send as image parts


@dataclass(frozen=True)
class Media:
    """A clip's content: a video file's bytes or a path to them, or decoded frames; `digest` names it."""

    digest: str
    label: str  # how results name it (a path, or "data:video/mp4 sha256:...")
    path: Path | None = None
    data: bytes | None = None
    suffix: str = ".mp4"
    frames: np.ndarray | None = None  # uint8 (T, H, W, 3) for image parts

    def portable(self) -> Media:
        """The same clip with its bytes in hand, for a process that may not see this one's files."""
        return self if self.path is None else replace(self, path=None, data=self.path.read_bytes(),
                                                      suffix=self.path.suffix or ".mp4")


def _data_url(url: str, kind: str, policy: MediaPolicy) -> tuple[bytes, str]:
    """The bytes and subtype of `data:<kind>/<subtype>;base64,...`."""
    header, comma, payload = url.partition(",")
    mime = header.removeprefix("data:").split(";")[0]
    if not comma or not header.endswith(";base64") or not mime.startswith(f"{kind}/"):
        raise RequestError(400, f"a data URL here must be data:{kind}/...;base64,...")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise RequestError(413, f"the {kind} is larger than the server's limit of {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"the {kind} data URL is not valid base64") from None
    subtype = mime.split("/", 1)[1].lower()
    return data, subtype if re.fullmatch(r"[a-z0-9]{1,10}", subtype) else ""  # a subtype names a file suffix


def _file_under_root(parsed: urllib.parse.ParseResult, policy: MediaPolicy) -> Path:
    if policy.root is None:
        raise RequestError(400, "file:// URLs need the server started with --media-root")
    if parsed.netloc.lower() not in ("", "localhost"):
        raise RequestError(400, f"a file:// URL names no host, got {parsed.netloc[:60]!r}")
    try:
        path = Path(urllib.parse.unquote(parsed.path, errors="strict")).resolve()
        if not path.is_relative_to(policy.root):
            raise RequestError(403, "the file is not under the server's --media-root")
        if not path.is_file():
            raise RequestError(404, "no such file under the server's --media-root")
        size = path.stat().st_size
    except (ValueError, UnicodeError, OSError):  # a NUL, a lone surrogate, a name too long for the file system
        raise RequestError(400, "the file:// path is not one this file system can hold") from None
    if size > policy.max_bytes:
        raise RequestError(413, f"the file is larger than the server's limit of {policy.max_bytes} bytes")
    return path


def _download(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_http:
        raise RequestError(400, "http(s) URLs are off: start the server with --allow-http to fetch them")
    deadline = time.monotonic() + policy.http_timeout_s
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=policy.http_timeout_s) as response:  # noqa: S310 - opted in
            while chunk := response.read(2**16):  # the whole download, not each read, is time-limited
                size += len(chunk)
                if size > policy.max_bytes:
                    raise RequestError(413, f"the download is larger than the server's limit of {policy.max_bytes} "
                                            "bytes")
                if time.monotonic() > deadline:
                    raise RequestError(400, f"the download took longer than {policy.http_timeout_s:g} s")
                chunks.append(chunk)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise RequestError(400, f"could not fetch the URL: {str(e)[:200]}") from None
    return b"".join(chunks)


def _bytes_of(url: str, kind: str, policy: MediaPolicy) -> tuple[bytes | None, Path | None, str]:
    """(data, path, subtype) of an image or video URL; exactly one of data and path is set."""
    try:
        parsed = urllib.parse.urlparse(url)
    except ValueError:
        raise RequestError(400, f"the {kind} URL is not a URL") from None
    scheme = parsed.scheme.lower()
    if scheme == "data":
        data, subtype = _data_url(url, kind, policy)
        return data, None, subtype
    if scheme == "file":
        path = _file_under_root(parsed, policy)
        return None, path, path.suffix.lstrip(".")
    if scheme in ("http", "https"):
        return _download(url, policy), None, ""
    raise RequestError(400, f"unsupported URL scheme {scheme[:20]!r}: use data:, file:// (under --media-root) or "
                            "http(s)")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(media: MediaRef, policy: MediaPolicy) -> Media:
    """The clip's content and hash (frames decoded from image parts), or a RequestError."""
    if media.video is not None:
        data, path, subtype = _bytes_of(media.video, "video", policy)
        content = data if data is not None else path.read_bytes()
        digest = _digest(content)
        label = str(path) if path is not None else f"{media.video.split(',')[0][:40]} sha256:{digest[:12]}"
        return Media(digest, label, path=path, data=data, suffix=f".{subtype or 'mp4'}")
    if len(media.images) > policy.max_frames:
        raise RequestError(400, f"{len(media.images)} image frames: the server takes at most {policy.max_frames}")
    contents, total = [], 0
    for url in media.images:
        data, path, _ = _bytes_of(url, "image", policy)
        content = data if data is not None else path.read_bytes()
        total += len(content)
        if total > policy.max_bytes:
            raise RequestError(413, f"the frames are larger than the server's limit of {policy.max_bytes} bytes")
        contents.append(content)
    digest = hashlib.sha256("".join(_digest(c) for c in contents).encode()).hexdigest()
    return Media(digest, f"{len(contents)} image frames sha256:{digest[:12]}", frames=_frames(contents))


def _frames(contents: list[bytes]) -> np.ndarray:
    """The images as uint8 (T, H, W, 3), their sizes checked from the headers before any is decoded:
    one size for all, each side within MAX_FRAME_SIDE and the video path's aspect-ratio bound, and all of
    them within MAX_CLIP_PIXELS, so the decoded clip, written once into its array, is bounded."""
    from PIL import Image, UnidentifiedImageError

    try:
        sizes = set()
        for content in contents:
            with Image.open(io.BytesIO(content)) as image:
                sizes.add(image.size)
        if len(sizes) != 1:
            raise RequestError(400, "the image frames of a clip must all have the same size")
        ((width, height),) = sizes
        if max(width, height) > MAX_FRAME_SIDE or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise RequestError(400, f"image frames of {width}x{height} pixels: at most {MAX_FRAME_SIDE} px a side "
                                    f"and an aspect ratio of {MAX_ASPECT_RATIO}:1")
        if len(contents) * width * height > MAX_CLIP_PIXELS:
            raise RequestError(400, f"{len(contents)} image frames of {width}x{height} pixels: more than the "
                                    f"{MAX_CLIP_PIXELS // 2**20} megapixels a clip of frames may have")
        frames = np.empty((len(contents), height, width, 3), np.uint8)
        for frame, content in zip(frames, contents, strict=True):
            with Image.open(io.BytesIO(content)) as image:
                frame[:] = np.asarray(image.convert("RGB"))
        return frames
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(400, "an image part is not an image PIL can read") from None


def decoded(media: Media, decode) -> DecodedVideo:
    """`media` as frames: image parts as they came, a video through `decode(path)` (the CLI's decoding,
    from a temporary file for bytes that came in the request)."""
    if media.frames is not None:
        count = len(media.frames)
        return DecodedVideo(media.frames, list(range(count)), 0.0, 0.0, "images", count)
    if media.path is not None:
        return decode(media.path)
    with tempfile.NamedTemporaryFile(suffix=media.suffix) as file:
        file.write(media.data)
        file.flush()
        try:
            return decode(Path(file.name))
        except UserError as e:  # it names the temporary file: name the clip as the client sent it
            raise UserError(str(e).replace(file.name, "the video")) from None
