"""ShapesQA-HD: a still textured background with sensor noise, still and moving objects that enter
and leave, and answers that match an independent reading of the rendered object masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidsparse.datasets import shapes, shapes_hd
from vidsparse.datasets.shapes_hd import FRAMES, SIZE
from vidsparse.video import decode_video

N = 14  # clips per generated data set (2 of each question type)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-hd")
    calls = []
    qa = shapes_hd.make_shapes_hd(out, N, seed=7, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (N, N) and len(calls) == N
    return out, qa


@pytest.fixture(scope="module")
def clips():
    """(type, clip, question, answer), drawn like make_shapes_hd draws them."""
    types = shapes_hd.QUESTION_TYPES
    drawn = [(types[i % len(types)], np.random.default_rng([3, i])) for i in range(140)]
    return [(qtype, *shapes_hd.sample(rng, qtype)) for qtype, rng in drawn]


def test_geometry_is_a_real_videos():
    assert shapes_hd.SIZE // shapes_hd.PATCH >= 8  # >= 64 patches + CLS a frame
    assert (shapes_hd.GRID**2 + 1) * FRAMES == 520
    assert shapes_hd.MIN_OBJ >= 12 and shapes_hd.MAX_OBJ <= 18


def test_qa_jsonl_format(dataset):
    out, qa = dataset
    rows = [json.loads(line) for line in qa.read_text().splitlines()]
    assert len(rows) == N and len({r["id"] for r in rows}) == N
    vocab = set(shapes_hd.vocabulary())
    for row in rows:
        assert set(row) == {"video", "question", "answer", "type", "id"} and row["id"].startswith("shapes-hd-7-")
        assert (out / row["video"]).is_file()
        assert set(row["question"].split()) <= vocab and row["answer"] in vocab
    per_type = {t: sum(r["type"] == t for r in rows) for t in shapes_hd.QUESTION_TYPES}
    assert per_type == dict.fromkeys(shapes_hd.QUESTION_TYPES, 2)


def test_deterministic_for_a_seed(dataset, tmp_path):
    out, qa = dataset
    short = shapes_hd.make_shapes_hd(tmp_path / "short", 3, seed=7)
    assert short.read_text().splitlines() == qa.read_text().splitlines()[:3]  # a prefix does not depend on n
    a, b = (shapes_hd.sample(np.random.default_rng([7, 5]), "moving")[0] for _ in range(2))
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.ids, b.ids)
    c = shapes_hd.sample(np.random.default_rng([8, 5]), "moving")[0]
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_mp4_decodes_to_the_rendered_frames(dataset, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    out, qa = dataset
    rows = [json.loads(line) for line in qa.read_text().splitlines()]
    for i in (0, 6, 13):
        video = decode_video(out / rows[i]["video"], num_frames=8, backend=backend)
        assert video.frames.shape == (FRAMES, SIZE, SIZE, 3) and video.indices == list(range(FRAMES))
        clip, question, answer = shapes_hd.sample(np.random.default_rng([7, i]), rows[i]["type"])
        assert (question, answer) == (rows[i]["question"], rows[i]["answer"])
        assert np.abs(video.frames.astype(int) - clip.frames).max() <= 3


def test_background_is_still_apart_from_sensor_noise(clips):
    for _, clip, _, _ in clips[:30]:
        never = (clip.ids == -1).all(0)  # pixels no object ever covers
        assert never.mean() > 0.5
        diff = clip.frames[:, never].astype(float) - clip.background[never]
        # rounding and clipping at 0 aside, what changes between frames is sensor noise only
        inside = (clip.background[never] > 3 * shapes_hd.NOISE).all(-1)
        assert abs(diff[:, inside].std() - shapes_hd.NOISE) < 0.5 and abs(diff[:, inside].mean()) < 0.3
        assert clip.background.std() > 3  # textured, not flat


def _masks(clip, k):
    return clip.ids == k  # (FRAMES, SIZE, SIZE)


def test_objects_are_drawn_by_the_rules(clips):
    moving = still = entering = leaving = windowed = 0
    for _, clip, _, _ in clips:
        n = len(clip.objects)
        assert shapes_hd.MIN_OBJECTS <= n <= shapes_hd.MAX_OBJECTS
        assert len({o.shape for o in clip.objects}) == n and len({o.color for o in clip.objects}) == n
        for k, o in enumerate(clip.objects):
            m = _masks(clip, k)
            drawn = m.sum((1, 2))
            assert np.array_equal(drawn, o.pixels)  # nothing drawn over it: objects never overlap
            (frames,) = np.nonzero(drawn)
            assert frames[-1] - frames[0] + 1 == len(frames)  # one contiguous visibility window
            assert drawn[frames].min() >= shapes_hd.MIN_VISIBLE
            full = shapes.shape_masks(o.size)[o.shape]
            assert (drawn == full.sum()).any()  # entirely inside in some frame
            for f in frames:  # what is drawn is the shape's mask at the object's position, cut by the frame
                assert np.array_equal(m[f], _placed(full, o.x[f], o.y[f]))
            if _moves(m):
                moving += 1
                assert len(frames) >= 3
                # a moving object is somewhere else in every visible frame
                assert all(not np.array_equal(m[a], m[a + 1]) for a in frames[:-1])
            else:
                still += 1
                assert len(frames) >= 2
            touches = [bool(m[f, 0].any() | m[f, -1].any() | m[f, :, 0].any() | m[f, :, -1].any()) for f in frames]
            if frames[0] > 0:
                entering += 1
                windowed += not touches[0]  # a still object put down in the middle of the frame
            leaving += frames[-1] < FRAMES - 1
    assert 0.35 < moving / (moving + still) < 0.65
    total = moving + still
    assert entering / total > 0.15 and leaving / total > 0.1 and windowed > 0


def _placed(mask, x, y):
    pad = 2 * SIZE
    canvas = np.zeros((SIZE + 2 * pad,) * 2, bool)
    canvas[y + pad : y + pad + len(mask), x + pad : x + pad + len(mask)] = mask
    return canvas[pad:-pad, pad:-pad]


def _moves(mask):
    visible = [f for f in range(FRAMES) if mask[f].any()]
    return any(not np.array_equal(mask[visible[0]], mask[f]) for f in visible[1:])


def test_some_objects_enter_over_the_edge():
    over_edge = 0
    for i in range(60):
        clip = shapes_hd.render_clip(np.random.default_rng([11, i]))
        for k, o in enumerate(clip.objects):
            m = _masks(clip, k)
            if o.moving and o.onset > 0 and o.pixels[o.onset] < shapes.shape_masks(o.size)[o.shape].sum():
                assert m[o.onset, 0].any() or m[o.onset, -1].any() or m[o.onset, :, 0].any() or m[o.onset, :, -1].any()
                over_edge += 1
    assert over_edge > 0


def _pixel_color(clip, k):
    px = clip.frames[clip.ids == k].astype(float)
    mean = px.mean(0) / px.mean(0).max()
    ref = {name: np.array(rgb) / max(rgb) for name, rgb in shapes.COLORS.items()}
    return min(ref, key=lambda name: np.abs(ref[name] - mean).sum())


def _shape_seen(clip, k):
    """The shape whose whole mask (at some size) is exactly object k's pixels in some frame."""
    m = _masks(clip, k)
    for f in range(FRAMES):
        ys, xs = np.nonzero(m[f])
        if not len(ys):
            continue
        for size in range(shapes_hd.MIN_OBJ, shapes_hd.MAX_OBJ + 1):
            for name, mask in shapes.shape_masks(size).items():
                y0, x0 = ys.min() - np.nonzero(mask.any(1))[0][0], xs.min() - np.nonzero(mask.any(0))[0][0]
                placed = _placed(mask, x0, y0)
                if placed.sum() == mask.sum() and np.array_equal(placed, m[f]):
                    return name
    raise AssertionError("no frame shows the whole object")


def test_answers_match_an_independent_reading_of_the_masks(clips):
    seen = set()
    for qtype, clip, question, answer in clips:
        n = len(clip.objects)
        vis = np.array([[(clip.ids[f] == k).any() for f in range(FRAMES)] for k in range(n)])
        onset = [int(np.argmax(v)) for v in vis]
        offset = [FRAMES - 1 - int(np.argmax(v[::-1])) for v in vis]
        colors = [_pixel_color(clip, k) for k in range(n)]
        if qtype == "color":
            (k,) = [k for k in range(n) if _shape_seen(clip, k) in question.split()]
            assert answer == colors[k]
        elif qtype == "shape":
            (k,) = [k for k in range(n) if colors[k] in question.split()]
            assert answer == _shape_seen(clip, k)
        elif qtype == "count":
            assert answer == shapes_hd.COUNT_WORDS[len(set(np.unique(clip.ids)) - {-1})]
        elif qtype == "first":
            k = int(np.argmin(onset))
            assert sorted(onset)[1] > onset[k] and answer == colors[k]
        elif qtype == "second":
            order = np.argsort(onset)
            ranked = sorted(onset) + [FRAMES]
            assert ranked[0] < ranked[1] < ranked[2] and answer == colors[int(order[1])]
        elif qtype == "disappears":
            k = int(np.argmin(offset))
            assert offset[k] < FRAMES - 1 and sorted(offset)[1] > offset[k] and answer == colors[k]
            assert not (clip.ids[offset[k] + 1 :] == k).any()
        elif qtype == "moving":
            assert answer == shapes_hd.MOVING_WORDS[sum(_moves(_masks(clip, k)) for k in range(n))]
        seen.add((qtype, answer))
    # every type is asked with several different answers
    for qtype in shapes_hd.QUESTION_TYPES:
        assert len({a for t, a in seen if t == qtype}) >= 3


def test_multi_frame_types_need_more_than_one_frame(clips):
    """No single frame shows the answer of every count / moving question."""
    count_needs_frames = moving_needs_frames = 0
    for qtype, clip, _, answer in clips:
        n_max = max(len(set(np.unique(clip.ids[f])) - {-1}) for f in range(FRAMES))
        if qtype == "count":
            count_needs_frames += n_max < len(clip.objects)
        if qtype == "moving":
            moving_needs_frames += answer != "zero"
    assert count_needs_frames > 0 and moving_needs_frames > 0


def test_patch_labels_follow_the_masks(clips):
    g, p = shapes_hd.GRID, shapes_hd.PATCH
    for _, clip, _, _ in clips[:10]:
        lab = clip.patch_labels()
        assert lab["color"].shape == (FRAMES, g * g)
        ids = clip.ids.reshape(FRAMES, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(FRAMES, g * g, -1)
        for f in range(FRAMES):
            for q in range(g * g):
                counts = np.bincount(ids[f, q] + 1, minlength=len(clip.objects) + 1)[1:]
                if counts.max() >= 4:
                    o = clip.objects[int(counts.argmax())]
                    assert lab["color"][f, q] == shapes.COLOR_NAMES.index(o.color) + 1
                    assert lab["shape"][f, q] == shapes.SHAPES.index(o.shape) + 1
                    assert np.all(np.abs(lab["center"][f, q]) <= 1)
                else:
                    assert not lab["has"][f, q] and lab["color"][f, q] == 0


def test_shape_masks_scale_and_keep_the_first_yardsticks():
    assert shapes.shape_masks(shapes.OBJ) is shapes.SHAPE_MASKS
    assert shapes.SHAPE_MASKS["cross"].sum() == 33  # 3-pixel arms at 7 px, as the shipped model saw
    for size in range(shapes_hd.MIN_OBJ, shapes_hd.MAX_OBJ + 1):
        masks = shapes.shape_masks(size)
        assert len({m.tobytes() for m in masks.values()}) == 4 and min(m.sum() for m in masks.values()) > size**2 / 3
        assert all(np.array_equal(m, m[:, ::-1]) for m in masks.values())  # left-right symmetric
        with pytest.raises(ValueError):
            masks["square"][0, 0] = False


def test_ask_rejects_unknown_types_and_undefined_questions():
    rng = np.random.default_rng(0)
    clip = shapes_hd.render_clip(np.random.default_rng(1))
    with pytest.raises(ValueError):
        shapes_hd.ask(clip, "direction", rng)
    with pytest.raises(ValueError):
        shapes_hd.sample(rng, "direction")
    undefined = dict.fromkeys(("first", "second", "disappears"), 0)
    for i in range(40):
        c = shapes_hd.render_clip(np.random.default_rng([2, i]))
        for t in undefined:
            try:
                shapes_hd.ask(c, t, rng)
            except ValueError:
                undefined[t] += 1
    assert all(v > 0 for v in undefined.values())
    q, a = shapes_hd.ask(clip, "describe", rng)
    assert q == shapes.AUX_QUESTIONS["describe"] and len(a.split()) == 2 * len(clip.objects)


def test_auxiliary_answers_match_the_masks(clips):
    for _, clip, _, _ in clips[:40]:
        n = len(clip.objects)
        colors = [_pixel_color(clip, k) for k in range(n)]
        order = sorted(range(n), key=lambda k: shapes.COLOR_NAMES.index(colors[k]))
        vis = [np.nonzero((clip.ids == k).any((1, 2)))[0] for k in range(n)]
        times = shapes_hd.ask(clip, "describe_times", None)[1].split()
        assert times == [
            w for k in order for w in (colors[k], shapes_hd.FRAME_WORDS[vis[k][0]], shapes_hd.FRAME_WORDS[vis[k][-1]])
        ]
        motion = shapes_hd.ask(clip, "describe_motion", None)[1].split()
        assert motion == [w for k in order for w in (colors[k], "moves" if _moves(_masks(clip, k)) else "still")]
        assert set(times + motion) <= set(shapes_hd.vocabulary())
