"""ShapesQA: a synthetic video question-answering set small enough to train a VideoLLaVA on a CPU.

Each clip is 8 frames of 32x32 RGB: 2-4 small coloured shapes (all different shapes, all different
colours) moving in straight lines over a dark, noisy, striped background, never overlapping.
Every clip carries one question of one type (``make_shapes`` cycles through them in this order):

- ``color``  "what color is the circle ?"          -> a colour name
- ``shape``  "what shape is the red object ?"      -> a shape name
- ``count``  "how many objects are there ?"        -> two / three / four
- ``first``  "which color appears first ?"         -> a colour name (temporal: objects have
  visibility windows; exactly one object appears before all others, so the answer depends on the
  order of the frames, not on any single frame)
- ``second`` "which color appears second ?"        -> a colour name (temporal: every object has its
  own onset frame; two steps: find the first onset, then the next one)

The renderer also returns its object-id masks, from which :meth:`Clip.patch_labels` derives per-patch
targets (colour, shape, object centre) for dense pretraining of the vision tower.

Everything is drawn from ``numpy.random.Generator``s; clip ``i`` of a seed uses its own generator
``default_rng([seed, i])``, so a data set is deterministic and its first k items do not depend on n.

Videos are written as H.264 (libx264, yuv444p, lossless ``qp 0``) at the native 32x32: 4:2:0 chroma
would smear a 7-pixel shape's colour into the background, and lossless 4:4:4 decodes (decord or
PyAV) to within 2 levels of the rendered RGB (only the RGB<->YUV rounding is lost), so what a user
decodes is what the model was trained on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidsparse.errors import UserError

FRAMES = 8
SIZE = 32  # frame height and width in pixels
PATCH = 8  # the vision tower's patch size: a 4x4 grid of patches a frame
GRID = SIZE // PATCH
OBJ = 7  # object bounding box (pixels)
FPS = 8

SHAPES = ("square", "circle", "triangle", "cross")
COLORS = {
    "red": (255, 38, 38),
    "green": (38, 255, 38),
    "blue": (64, 90, 255),
    "yellow": (255, 255, 25),
    "white": (255, 255, 255),
    "purple": (190, 50, 255),
}
COLOR_NAMES = tuple(COLORS)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
MIN_OBJECTS, MAX_OBJECTS = 2, 4
QUESTION_TYPES = ("color", "shape", "count", "first", "second")
TEMPORAL_TYPES = frozenset({"first", "second"})
# Auxiliary training tasks (not in the data sets): every object's colour and shape, listed in colour
# order ("red circle blue square") or in shape order ("square blue circle red"). Each order teaches
# one direction of the colour <-> shape binding that the color and shape questions need.
AUX_QUESTIONS = {"describe": "describe the objects ?", "describe_shapes": "describe the shapes ?"}

QUESTION_TEMPLATES = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is the {color} object ?",
    "count": "how many objects are there ?",
    "first": "which color appears first ?",
    "second": "which color appears second ?",
}

# Which clips a question type is asked about (render_clip's ``temporal``).
CLIP_STYLE: dict[str, bool | str] = {"first": True, "second": "ordered"}

# Guessing with no video: uniform over the answers the question allows.
CHANCE = {
    "color": 1 / len(COLORS),
    "shape": 1 / len(SHAPES),
    "count": 1 / len(COUNT_WORDS),
    "first": 1 / len(COLORS),
    "second": 1 / len(COLORS),
}


@functools.cache
def shape_masks(s: int) -> dict[str, np.ndarray]:
    """Boolean s x s masks of every shape (the cross's arms are ~3/7 of s wide, as at s = 7).
    Shared with ShapesQA-HD, which draws objects of several sizes. Read-only: cached per size."""
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    masks = {
        "square": np.ones((s, s), bool),
        "circle": (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2 * 0.85,
        "triangle": (yy >= np.abs(xx - c) * 2 - 0.5) & (yy <= s - 1),
        "cross": (np.abs(yy - c) <= s / 7) | (np.abs(xx - c) <= s / 7),
    }
    for m in masks.values():
        m.flags.writeable = False
    return masks


SHAPE_MASKS = shape_masks(OBJ)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    x: np.ndarray  # (FRAMES,) int, left column of the bounding box
    y: np.ndarray  # (FRAMES,) int, top row of the bounding box
    visible: np.ndarray  # (FRAMES,) bool


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 (FRAMES, SIZE, SIZE, 3), exactly what is stored in the mp4
    objects: tuple[ShapeObject, ...]
    ids: np.ndarray  # int8 (FRAMES, SIZE, SIZE): index of the object drawn at a pixel, -1 = background

    def patch_labels(self, min_pixels: int = 3, patch: int = PATCH) -> dict[str, np.ndarray]:
        """Per-patch targets, (FRAMES, GRID*GRID) row-major like the vision tower's patches (``patch``:
        another tower's patch size, (FRAMES, (SIZE // patch)**2)).

        ``color`` 0 = background else 1 + index in COLOR_NAMES; ``shape`` 0 = background else
        1 + index in SHAPES; ``has`` whether an object covers >= min_pixels of the patch (the
        dominant one gives the labels); ``center`` (.., 2) the dominant object's centre x, y in
        [-1, 1] (0 where ``has`` is False).
        """
        cx = np.stack([o.x + OBJ / 2 for o in self.objects], 1) / SIZE * 2 - 1  # (FRAMES, n)
        cy = np.stack([o.y + OBJ / 2 for o in self.objects], 1) / SIZE * 2 - 1
        return patch_labels(self.ids, self.objects, np.stack([cx, cy], -1), patch, min_pixels)


def patch_labels(ids: np.ndarray, objects, centers: np.ndarray, patch: int, min_pixels: int) -> dict[str, np.ndarray]:
    """Per-patch targets from an object-id video ``ids`` (T, H, W) (-1 = background), for objects
    with ``.color`` and ``.shape``, and ``centers`` (T, n, 2) of each object in [-1, 1] (x, y).
    Shared by both yardsticks; see :meth:`Clip.patch_labels` for the meaning of the outputs."""
    frames, grid = ids.shape[0], ids.shape[1] // patch
    n = len(objects)
    counts = np.stack([(ids == k).reshape(frames, grid, patch, grid, patch).sum((2, 4)) for k in range(n)], -1)
    dominant = counts.argmax(-1).reshape(frames, grid * grid)
    has = (counts.max(-1) >= min_pixels).reshape(frames, grid * grid)
    color_cls = np.array([COLOR_NAMES.index(o.color) + 1 for o in objects])
    shape_cls = np.array([SHAPES.index(o.shape) + 1 for o in objects])
    center = np.stack([np.take_along_axis(centers[..., i], dominant, 1) for i in range(2)], -1)
    return {
        "color": np.where(has, color_cls[dominant], 0),
        "shape": np.where(has, shape_cls[dominant], 0),
        "has": has,
        "center": np.where(has[..., None], center, 0.0).astype(np.float32),
    }


def _trajectory(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A straight-line path of the bounding box's top-left corner that stays inside the frame."""
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.75, 2.0)  # pixels per frame
    vx, vy = speed * np.cos(angle), speed * np.sin(angle)
    t = np.arange(FRAMES)
    hi = SIZE - OBJ
    span_x, span_y = vx * (FRAMES - 1), vy * (FRAMES - 1)
    x0 = rng.uniform(max(0.0, -span_x), min(hi, hi - span_x))
    y0 = rng.uniform(max(0.0, -span_y), min(hi, hi - span_y))
    return np.round(x0 + vx * t).astype(int), np.round(y0 + vy * t).astype(int)


def _apart(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Bounding boxes at least one pixel apart in every frame."""
    return bool(np.all(np.maximum(np.abs(a[0] - b[0]), np.abs(a[1] - b[1])) >= OBJ + 1))


def _place(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n mutually non-overlapping trajectories. The count stays n (retry from scratch rather than
    drop an object), so the number of objects is not biased by how crowded a clip is."""
    while True:
        paths: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(200):
            p = _trajectory(rng)
            if all(_apart(p, q) for q in paths):
                paths.append(p)
                if len(paths) == n:
                    return paths


def _visibility(rng: np.random.Generator, n: int, temporal: bool | str) -> np.ndarray:
    vis = np.ones((n, FRAMES), bool)
    if temporal == "ordered":
        # Every object has its own onset (frames 0-5, object k the k-th to appear), visible 3-5 frames.
        onsets = np.sort(rng.choice(FRAMES - 2, n, replace=False))
        vis[:] = False
        for k, on in enumerate(onsets):
            vis[k, on : on + int(rng.integers(3, 6))] = True
    elif temporal:
        # Object 0 appears first (frame 0-2); the others appear >= 2 frames later (ties among
        # them allowed). Each stays visible 3-5 frames, independent of the order.
        first = int(rng.integers(0, 3))
        onsets = [first] + [int(rng.integers(first + 2, FRAMES - 2)) for _ in range(n - 1)]
        vis[:] = False
        for k, on in enumerate(onsets):
            vis[k, on : on + int(rng.integers(3, 6))] = True
    return vis


def render_clip(rng: np.random.Generator, n_objects: int | None = None, temporal: bool | str = False) -> Clip:
    """One clip. ``temporal=True`` gives objects visibility windows with a unique first object
    (``objects[0]``); ``temporal="ordered"`` gives every object its own onset frame (``objects[k]``
    is the k-th to appear); otherwise every object is visible in every frame."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:n]]
    paths = _place(rng, n)
    vis = _visibility(rng, n, temporal)
    objects = tuple(ShapeObject(s, c, x, y, v) for s, c, (x, y), v in zip(shapes, colors, paths, vis, strict=True))

    # Background: a dark random tint, pixel noise, and faint moving stripes of random orientation.
    tint = rng.uniform(0, 45, 3)
    freq = rng.uniform(0.25, 0.6)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    along = xx * np.cos(theta) + yy * np.sin(theta)
    img = np.empty((FRAMES, SIZE, SIZE, 3))
    ids = np.full((FRAMES, SIZE, SIZE), -1, np.int8)
    for f in range(FRAMES):
        stripes = 20 * np.sin(along * freq + 0.8 * f)
        frame = tint + stripes[..., None] + rng.normal(0, 15, (SIZE, SIZE, 3))
        for k, o in enumerate(objects):
            if not o.visible[f]:
                continue
            mask = SHAPE_MASKS[o.shape]
            ys, xs = slice(o.y[f], o.y[f] + OBJ), slice(o.x[f], o.x[f] + OBJ)
            frame[ys, xs][mask] = np.array(COLORS[o.color]) * rng.uniform(0.85, 1.0)
            ids[f, ys, xs][mask] = k
        img[f] = frame
    frames = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Clip(frames, objects, ids)


def describe(clip: Clip, by: str = "color") -> str:
    """Answer of an auxiliary task: "<color> <shape>" for every object in COLOR_NAMES order
    (``by="color"``), or "<shape> <color>" in SHAPES order (``by="shape"``)."""
    if by == "color":
        return " ".join(f"{o.color} {o.shape}" for o in sorted(clip.objects, key=lambda o: COLOR_NAMES.index(o.color)))
    return " ".join(f"{o.shape} {o.color}" for o in sorted(clip.objects, key=lambda o: SHAPES.index(o.shape)))


def ask(clip: Clip, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of type ``qtype`` about ``clip`` (``first`` needs a temporal clip)."""
    if qtype in AUX_QUESTIONS:
        return AUX_QUESTIONS[qtype], describe(clip, by="color" if qtype == "describe" else "shape")
    if qtype == "count":
        return QUESTION_TEMPLATES["count"], COUNT_WORDS[len(clip.objects)]
    if qtype in ("first", "second"):
        rank = 0 if qtype == "first" else 1
        onsets = [int(np.argmax(o.visible)) if o.visible.any() else FRAMES for o in clip.objects]
        order = np.argsort(onsets, kind="stable")
        ranked = sorted(onsets) + [FRAMES + 1]
        if ranked[rank + 1] == ranked[rank] or (rank and ranked[0] == ranked[1]) or max(onsets) == FRAMES:
            raise ValueError(f"{qtype!r} needs a temporal clip where the answer's onset is unique")
        return QUESTION_TEMPLATES[qtype], clip.objects[int(order[rank])].color
    o = clip.objects[int(rng.integers(len(clip.objects)))]
    if qtype == "color":
        return QUESTION_TEMPLATES["color"].format(shape=o.shape), o.color
    if qtype == "shape":
        return QUESTION_TEMPLATES["shape"].format(color=o.color), o.shape
    raise ValueError(f"unknown question type {qtype!r}")


def sample(rng: np.random.Generator, qtype: str) -> tuple[Clip, str, str]:
    """A fresh clip of the style ``qtype`` needs, with its question and answer."""
    clip = render_clip(rng, temporal=CLIP_STYLE.get(qtype, False))
    question, answer = ask(clip, qtype, rng)
    return clip, question, answer


def vocabulary() -> list[str]:
    """Every word of every question and answer (the prompt template's words come from the tokenizer)."""
    texts = [*QUESTION_TEMPLATES.values(), *AUX_QUESTIONS.values(), *SHAPES, *COLOR_NAMES, *COUNT_WORDS.values()]
    return words_of(texts)


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct words of ``texts`` in order of first use, template slots left out."""
    words: list[str] = []
    for text in texts:
        for w in text.replace("{shape}", "").replace("{color}", "").split():
            if w not in words:
                words.append(w)
    return words


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS) -> None:
    """uint8 (T, H, W, 3) RGB -> lossless H.264 4:4:4 mp4 (deterministic: one encoder thread)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0", "preset": "medium", "threads": "1"}
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_shapes(
    out_dir: Path,
    n: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write n clips (``00000.mp4`` ...) and ``qa.jsonl`` (one question a clip) to ``out_dir``.

    Question types cycle color, shape, count, first, second, so every type gets n/5 questions.
    Returns the path of ``qa.jsonl``. ``progress(done, n)`` is called after each clip.
    """
    return write_dataset(out_dir, n, seed, QUESTION_TYPES, sample, "shapes", progress)


def write_dataset(
    out_dir: Path,
    n: int,
    seed: int,
    question_types: tuple[str, ...],
    draw: Callable[[np.random.Generator, str], tuple],
    prefix: str,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The ``make_shapes`` writer of every ShapesQA variant: clip i has type ``question_types[i % k]``
    and is ``draw(default_rng([seed, i]), type) -> (clip with .frames, question, answer)``; id
    ``{prefix}-{seed}-{i:05d}``. Only into a new or empty folder, or one that holds this same data set
    (its ids: same kind, n and seed), which is written again (so a damaged clip is repaired): clips of
    another data set left beside new ones, and results files pointing at them, would be silently wrong."""
    out_dir = Path(out_dir)
    qa = out_dir / "qa.jsonl"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _holds(out_dir, [f"{prefix}-{seed}-{i:05d}"
                                                                            for i in range(n)]):
        raise UserError(f"{out_dir} is not empty: make-shapes writes a data set into a new or empty folder "
                        "(delete it to replace what it holds)")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        qtype = question_types[i % len(question_types)]
        clip, question, answer = draw(np.random.default_rng([seed, i]), qtype)
        name = f"{i:05d}.mp4"
        write_video(out_dir / name, clip.frames)
        lines.append(
            json.dumps(
                {"video": name, "question": question, "answer": answer, "type": qtype, "id": f"{prefix}-{seed}-{i:05d}"}
            )
        )
        if progress is not None:
            progress(i + 1, n)
    qa.write_text("".join(line + "\n" for line in lines))
    return qa


def _holds(folder: Path, ids: list[str]) -> bool:
    """Whether `folder`'s qa.jsonl is that of the data set of these ids (files beside it, such as the
    results of a run over it, are left alone when it is written again)."""
    try:
        items = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines() if line.strip()]
        return [item.get("id") for item in items] == ids
    except (OSError, ValueError, AttributeError):
        return False
