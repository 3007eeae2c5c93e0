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
import io
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vidsparse.serve.chat import MediaRef, RequestError
from vidsparse.video import DecodedVideo


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read: files under `root` (None: no file:// URL), http(s) URLs when
    `allow_http`, at most `max_bytes` per clip and `http_timeout_s` per download."""

    root: Path | None
    allow_http: bool
    max_bytes: int
    http_timeout_s: float = 30.0


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
    return data, mime.split("/", 1)[1]


def _file_under_root(url: str, policy: MediaPolicy) -> Path:
    if policy.root is None:
        raise RequestError(400, "file:// URLs need the server started with --media-root")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise RequestError(400, f"a file:// URL names no host, got {parsed.netloc!r}")
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(policy.root):
        raise RequestError(403, "the file is not under the server's --media-root")
    if not path.is_file():
        raise RequestError(404, "no such file under the server's --media-root")
    if path.stat().st_size > policy.max_bytes:
        raise RequestError(413, f"the file is larger than the server's limit of {policy.max_bytes} bytes")
    return path


def _download(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_http:
        raise RequestError(400, "http(s) URLs are off: start the server with --allow-http to fetch them")
    try:
        with urllib.request.urlopen(url, timeout=policy.http_timeout_s) as response:  # noqa: S310 - opted in
            data = response.read(policy.max_bytes + 1)
    except (OSError, ValueError) as e:
        raise RequestError(400, f"could not fetch the URL: {e}") from None
    if len(data) > policy.max_bytes:
        raise RequestError(413, f"the download is larger than the server's limit of {policy.max_bytes} bytes")
    return data


def _bytes_of(url: str, kind: str, policy: MediaPolicy) -> tuple[bytes | None, Path | None, str]:
    """(data, path, subtype) of an image or video URL; exactly one of data and path is set."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "data":
        data, subtype = _data_url(url, kind, policy)
        return data, None, subtype
    if scheme == "file":
        path = _file_under_root(url, policy)
        return None, path, path.suffix.lstrip(".")
    if scheme in ("http", "https"):
        return _download(url, policy), None, Path(urllib.parse.urlparse(url).path).suffix.lstrip(".")
    raise RequestError(400, f"unsupported URL scheme {scheme!r}: use data:, file:// (under --media-root) or http(s)")


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
    frames, hasher, total = [], hashlib.sha256(), 0
    for url in media.images:
        data, path, _ = _bytes_of(url, "image", policy)
        content = data if data is not None else path.read_bytes()
        total += len(content)
        if total > policy.max_bytes:
            raise RequestError(413, f"the frames are larger than the server's limit of {policy.max_bytes} bytes")
        hasher.update(_digest(content).encode())
        frames.append(_image(content))
    if len({f.shape for f in frames}) != 1:
        raise RequestError(400, "the image frames of a clip must all have the same size")
    digest = hasher.hexdigest()
    return Media(digest, f"{len(frames)} image frames sha256:{digest[:12]}", frames=np.stack(frames))


def _image(content: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as image:
            if image.width * image.height > 8192 * 8192:
                raise RequestError(400, "an image frame is larger than 8192 x 8192 pixels")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(400, "an image part is not a PNG/JPEG image PIL can read") from None


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
        return decode(Path(file.name))
