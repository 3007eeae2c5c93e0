"""ShapesQA-HD: the second ShapesQA yardstick, with a real video's token geometry and dynamics.

Why a second one: the first ShapesQA (``shapes.py``) has 4x4 patches a frame (136 visual tokens),
so a 10% budget is under two tokens a frame. Video-LLaVA-7B has 16x16 patches + CLS a frame. Here a
frame is 64x64 pixels, patch 8: 8x8 patches + CLS = 65 tokens, 8 frames = 520 visual tokens, and
the video behaves like footage from a still camera, which is what video pruning methods exploit:

- a fixed textured background per clip (smooth gratings + fixed grain; the camera does not move),
  plus small per-frame sensor noise (sigma ``NOISE`` levels, on every pixel) -- so background
  patches are near-duplicates across frames, as in real video;
- 2-4 objects (all different shapes and colours), each 12-18 px across (2-3 patches), never
  overlapping; about half are **still** (the same pixels in every frame they are in), the others
  **move** in straight lines at 2-4 px a frame;
- objects **enter and leave**: moving ones cross the frame edge, still ones may be put down or
  taken away (a contiguous visibility window). Every object is visible in at least 2 frames
  (moving ones 3), entirely inside the frame in at least one, and shows at least ``MIN_VISIBLE``
  pixels in every frame it is visible in (no one-pixel slivers to argue about).

Definitions (``visible in frame f`` = at least one of the object's pixels is drawn in frame f;
``onset`` = first such frame, ``offset`` = last such frame; visibility is always contiguous):

- ``color``  "what color is the {shape} ?"   -> that object's colour (each shape occurs once).
- ``shape``  "what shape is the {color} object ?" -> that object's shape.
- ``count``  "how many objects are there ?"  -> the number of distinct objects visible anywhere in
  the clip (two/three/four), not in one frame: objects enter and leave, so one frame may show fewer.
- ``first``  "which color appears first ?"   -> the object with the earliest onset, asked only
  when that onset is unique (objects visible from frame 0 count as appearing at frame 0).
- ``second`` "which color appears second ?"  -> the object with the second-earliest onset, asked
  only when the first and second onsets are both unique (onset_1 < onset_2 < every other onset).
- ``disappears`` "which color disappears first ?" -> the object with the earliest offset, asked
  only when that offset is unique and before the last frame (an object still visible in the last
  frame never disappears). Needs several frames: where each object is last seen.
- ``moving`` "how many objects move ?"       -> how many objects change position over the clip
  (zero..four); a still object's pixels are identical in every frame it is visible in. Needs
  several frames: a single frame shows no motion.

A clip is drawn, then redrawn (same generator) until the question is defined, so every answer
is unique. Clip i of a seed uses ``default_rng([seed, i])``. The colours, shape masks (by size),
patch labels, mp4 writer and data-set writer are the first ShapesQA's (``shapes.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import vidsparse.datasets.shapes as shapes
from vidsparse.datasets.shapes import COLOR_NAMES, COLORS, SHAPES, describe, shape_masks, write_video

FRAMES = 8
SIZE = 64  # frame height and width in pixels
PATCH = 8  # 8x8 patches + CLS = 65 tokens a frame
GRID = SIZE // PATCH
FPS = shapes.FPS
MIN_OBJ, MAX_OBJ = 12, 18  # object bounding-box side, pixels (2-3 patches)
MIN_OBJECTS, MAX_OBJECTS = 2, 4
SPEED = (2.0, 4.0)  # pixels a frame of a moving object
P_MOVING = 0.5  # chance that an object moves
P_WINDOW = 0.7  # chance that a still object is put down or taken away during the clip
MIN_VISIBLE = 16  # pixels an object shows in every frame it is visible in
NOISE = 3.0  # sensor noise, standard deviation in 8-bit levels

COUNT_WORDS = shapes.COUNT_WORDS
MOVING_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
QUESTION_TYPES = ("color", "shape", "count", "first", "second", "disappears", "moving")
TEMPORAL_TYPES = frozenset({"first", "second", "disappears"})  # answers that depend on frame order
MULTI_FRAME_TYPES = frozenset({"count", "first", "second", "disappears", "moving"})
FRAME_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
# Auxiliary training tasks (not in the data sets), dense per-object answers in COLOR_NAMES order:
# the first ShapesQA's two descriptions (colour <-> shape binding), plus when each object is visible
# ("red zero seven blue two five": onset and offset frames) and whether it moves ("red moves blue
# still"). They teach the per-object facts that first/second/disappears and moving combine.
AUX_QUESTIONS = {
    **shapes.AUX_QUESTIONS,
    "describe_times": "describe the times ?",
    "describe_motion": "describe the motion ?",
}
QUESTION_TEMPLATES = {
    **shapes.QUESTION_TEMPLATES,
    "disappears": "which color disappears first ?",
    "moving": "how many objects move ?",
}
CHANCE = {
    **shapes.CHANCE,
    "disappears": 1 / len(COLORS),
    "moving": 1 / len(MOVING_WORDS),
}


@dataclass(frozen=True)
class HDObject:
    shape: str
    color: str
    size: int  # bounding-box side, pixels
    x: np.ndarray  # (FRAMES,) int, left column of the bounding box (may lie outside the frame)
    y: np.ndarray  # (FRAMES,) int, top row of the bounding box
    pixels: np.ndarray  # (FRAMES,) int, mask pixels drawn in each frame (0 = not visible)

    @property
    def visible(self) -> np.ndarray:
        return self.pixels > 0

    @property
    def moving(self) -> bool:
        return bool(np.ptp(self.x) + np.ptp(self.y) > 0)

    @property
    def onset(self) -> int:
        return int(np.argmax(self.visible))

    @property
    def offset(self) -> int:
        return FRAMES - 1 - int(np.argmax(self.visible[::-1]))


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 (FRAMES, SIZE, SIZE, 3), exactly what is stored in the mp4
    objects: tuple[HDObject, ...]
    ids: np.ndarray  # int8 (FRAMES, SIZE, SIZE): index of the object drawn at a pixel, -1 = background
    background: np.ndarray  # float (SIZE, SIZE, 3): the still scene before objects and sensor noise

    def patch_labels(self, min_pixels: int = 4) -> dict[str, np.ndarray]:
        """Per-patch targets, (FRAMES, GRID*GRID), as :meth:`shapes.Clip.patch_labels`; the centre
        is that of the object's pixels visible in the frame (it may be partly outside)."""
        centers = np.zeros((FRAMES, len(self.objects), 2))
        for k in range(len(self.objects)):
            for f in range(FRAMES):
                ys, xs = np.nonzero(self.ids[f] == k)
                if len(xs):
                    centers[f, k] = (xs.mean() + 0.5, ys.mean() + 0.5)
        return shapes.patch_labels(self.ids, self.objects, centers / SIZE * 2 - 1, PATCH, min_pixels)


def _visible_pixels(mask: np.ndarray, x: int, y: int) -> int:
    """Pixels of ``mask`` (top-left at x, y) that fall inside the frame."""
    s = mask.shape[0]
    return int(mask[max(0, -y) : max(0, min(s, SIZE - y)), max(0, -x) : max(0, min(s, SIZE - x))].sum())


def _track(
    rng: np.random.Generator, shape: str, size: int, moving: bool, p_window: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A still or moving object's bounding-box path and its drawn pixels per frame, or None when
    the draw breaks a visibility rule (the caller draws again, keeping ``moving``, so that the
    share of moving objects stays P_MOVING)."""
    t = np.arange(FRAMES)
    shown = np.ones(FRAMES, bool)
    if moving:
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(*SPEED)
        # The centre passes through a random point of the frame at a random time, so paths enter,
        # cross or leave the frame anywhere in the clip.
        cx, cy, tc = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(0, FRAMES - 1)
        x = np.round(cx + speed * np.cos(angle) * (t - tc) - size / 2).astype(int)
        y = np.round(cy + speed * np.sin(angle) * (t - tc) - size / 2).astype(int)
        min_frames = 3
    else:
        x = np.full(FRAMES, int(rng.integers(0, SIZE - size + 1)))
        y = np.full(FRAMES, int(rng.integers(0, SIZE - size + 1)))
        if rng.random() < p_window:  # put down and/or taken away: a window of >= 2 frames
            on = int(rng.integers(0, FRAMES - 1))
            off = int(rng.integers(on + 1, FRAMES))
            shown = (t >= on) & (t <= off)
        min_frames = 2
    mask = shape_masks(size)[shape]
    pixels = np.array([_visible_pixels(mask, x[f], y[f]) if shown[f] else 0 for f in range(FRAMES)])
    (frames,) = np.nonzero(pixels)
    if (
        len(frames) < min_frames
        or frames[-1] - frames[0] + 1 != len(frames)  # one contiguous window (a cross can clip a corner)
        or pixels[frames].min() < MIN_VISIBLE
        or not (pixels == mask.sum()).any()  # entirely inside in some frame: its shape is seen
    ):
        return None
    return x, y, pixels


def _apart(a: HDObject, b: HDObject) -> bool:
    """Bounding boxes at least one pixel apart in every frame where both objects are visible."""
    both = a.visible & b.visible
    gap_x = np.maximum(a.x - (b.x + b.size), b.x - (a.x + a.size))
    gap_y = np.maximum(a.y - (b.y + b.size), b.y - (a.y + a.size))
    return bool(np.all(np.maximum(gap_x, gap_y)[both] >= 1))


def _place(rng: np.random.Generator, shapes_: list[str], colors: list[str], p_window: float) -> tuple[HDObject, ...]:
    """Non-overlapping objects; restart from scratch rather than drop one (the count stays n)."""
    moving = rng.random(len(shapes_)) < P_MOVING
    while True:
        objects: list[HDObject] = []
        for _ in range(400):
            k = len(objects)
            size = int(rng.integers(MIN_OBJ, MAX_OBJ + 1))
            track = _track(rng, shapes_[k], size, bool(moving[k]), p_window)
            if track is None:
                continue
            o = HDObject(shapes_[k], colors[k], size, *track)
            if all(_apart(o, p) for p in objects):
                objects.append(o)
                if len(objects) == len(shapes_):
                    return tuple(objects)


def background(rng: np.random.Generator) -> np.ndarray:
    """A still, dark, textured scene: a random tint, three smooth gratings and a fixed grain."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    tint = rng.uniform(10, 60, 3)
    texture = np.zeros((SIZE, SIZE))
    for _ in range(3):
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.35)
        texture += rng.uniform(4, 12) * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 6.3))
    tone = rng.uniform(0.5, 1.0, 3)  # the texture's colour
    return tint + texture[..., None] * tone + rng.normal(0, 5, (SIZE, SIZE, 3))


def render_clip(rng: np.random.Generator, n_objects: int | None = None, p_window: float = P_WINDOW) -> Clip:
    """One clip of ``n_objects`` (default 2-4 at random) objects over a still background; a still
    object is put down or taken away with probability ``p_window`` (training may change it)."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    shape_names = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:n]]
    objects = _place(rng, shape_names, colors, p_window)
    bg = background(rng)
    img = np.repeat(bg[None], FRAMES, 0)
    ids = np.full((FRAMES, SIZE, SIZE), -1, np.int8)
    pad = MAX_OBJ  # draw on a padded canvas so objects can hang over the edge
    for k, o in enumerate(objects):
        mask, rgb = shape_masks(o.size)[o.shape], np.array(COLORS[o.color]) * rng.uniform(0.85, 1.0)
        for f in np.nonzero(o.visible)[0]:
            canvas = np.zeros((SIZE + 2 * pad, SIZE + 2 * pad), bool)
            canvas[o.y[f] + pad : o.y[f] + pad + o.size, o.x[f] + pad : o.x[f] + pad + o.size] = mask
            drawn = canvas[pad:-pad, pad:-pad]
            img[f][drawn] = rgb
            ids[f][drawn] = k
    img += rng.normal(0, NOISE, img.shape)
    return Clip(np.clip(np.round(img), 0, 255).astype(np.uint8), objects, ids, bg)


def event_time(obj: HDObject, qtype: str) -> int:
    """The frame an order question ranks objects by: the offset for ``disappears``, else the onset."""
    return obj.offset if qtype == "disappears" else obj.onset


def ask(clip: Clip, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of type ``qtype`` about ``clip``; ValueError when the clip does not
    define a unique answer (see the module docstring)."""
    objs = clip.objects
    by_color = sorted(objs, key=lambda o: COLOR_NAMES.index(o.color))
    if qtype == "describe_times":
        return AUX_QUESTIONS[qtype], " ".join(
            f"{o.color} {FRAME_WORDS[o.onset]} {FRAME_WORDS[o.offset]}" for o in by_color
        )
    if qtype == "describe_motion":
        return AUX_QUESTIONS[qtype], " ".join(f"{o.color} {'moves' if o.moving else 'still'}" for o in by_color)
    if qtype in AUX_QUESTIONS:
        return AUX_QUESTIONS[qtype], describe(clip, by="color" if qtype == "describe" else "shape")
    if qtype == "count":
        return QUESTION_TEMPLATES["count"], COUNT_WORDS[len(objs)]
    if qtype == "moving":
        return QUESTION_TEMPLATES["moving"], MOVING_WORDS[sum(o.moving for o in objs)]
    if qtype in TEMPORAL_TYPES:
        times = [event_time(o, qtype) for o in objs]
        rank = 1 if qtype == "second" else 0
        ranked = sorted(times) + [FRAMES]
        if len(set(ranked[: rank + 2])) < rank + 2 or (qtype == "disappears" and ranked[0] == FRAMES - 1):
            raise ValueError(f"{qtype!r} is not defined for this clip (tie, or nothing disappears)")
        return QUESTION_TEMPLATES[qtype], objs[times.index(ranked[rank])].color
    o = objs[int(rng.integers(len(objs)))]
    if qtype == "color":
        return QUESTION_TEMPLATES["color"].format(shape=o.shape), o.color
    if qtype == "shape":
        return QUESTION_TEMPLATES["shape"].format(color=o.color), o.shape
    raise ValueError(f"unknown question type {qtype!r}")


def sample(
    rng: np.random.Generator, qtype: str, max_objects: int = MAX_OBJECTS, p_window: float = P_WINDOW
) -> tuple[Clip, str, str]:
    """A clip that defines a ``qtype`` question, with the question and its answer (clips are drawn
    until one does; ``max_objects`` caps the objects for a training curriculum)."""
    while True:
        clip = render_clip(rng, int(rng.integers(MIN_OBJECTS, max_objects + 1)), p_window)
        try:
            question, answer = ask(clip, qtype, rng)
        except ValueError:
            if qtype not in QUESTION_TEMPLATES and qtype not in AUX_QUESTIONS:
                raise
            continue
        return clip, question, answer


def vocabulary() -> list[str]:
    """Every word of every question and answer."""
    return shapes.words_of(
        [
            *QUESTION_TEMPLATES.values(),
            *AUX_QUESTIONS.values(),
            *SHAPES,
            *COLOR_NAMES,
            *COUNT_WORDS.values(),
            *MOVING_WORDS.values(),
            *FRAME_WORDS,
            "moves still",
        ]
    )


def make_shapes_hd(
    out_dir: Path,
    n: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write n ShapesQA-HD clips (``00000.mp4`` ...) and ``qa.jsonl`` to ``out_dir``, like
    :func:`shapes.make_shapes` (question types cycle through ``QUESTION_TYPES``)."""
    return shapes.write_dataset(out_dir, n, seed, QUESTION_TYPES, sample, "shapes-hd", progress)


__all__ = ["QUESTION_TYPES", "Clip", "HDObject", "ask", "make_shapes_hd", "render_clip", "sample", "write_video"]
