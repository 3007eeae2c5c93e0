"""The ShapesQA generator: deterministic, non-overlapping objects, answers that match the pixels,
and mp4 files that decode back to what the model is trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidsparse.datasets import make_shapes, shapes
from vidsparse.video import decode_video

N = 10  # clips per generated data set (2 of each question type)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    calls = []
    qa = make_shapes(out, N, seed=7, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (N, N) and len(calls) == N
    return out, qa


def _clips(n=120, seed=3):
    """Clips of every style with their questions, drawn like make_shapes draws them."""
    out = []
    for i in range(n):
        qtype = shapes.QUESTION_TYPES[i % len(shapes.QUESTION_TYPES)]
        out.append((qtype, *shapes.sample(np.random.default_rng([seed, i]), qtype)))
    return out


def test_qa_jsonl_format(dataset):
    out, qa = dataset
    assert qa == out / "qa.jsonl"
    rows = [json.loads(line) for line in qa.read_text().splitlines()]
    assert len(rows) == N
    vocab = set(shapes.vocabulary())
    for row in rows:
        assert set(row) == {"video", "question", "answer", "type", "id"}
        assert (out / row["video"]).is_file() and "/" not in row["video"]
        assert row["type"] in shapes.QUESTION_TYPES
        assert set(row["question"].split()) <= vocab and row["question"].endswith(" ?")
        assert row["answer"] in vocab
    assert len({r["id"] for r in rows}) == N
    per_type = {t: sum(r["type"] == t for r in rows) for t in shapes.QUESTION_TYPES}
    assert per_type == dict.fromkeys(shapes.QUESTION_TYPES, N // len(shapes.QUESTION_TYPES))


def test_deterministic_for_a_seed(dataset, tmp_path):
    out, qa = dataset
    again = make_shapes(tmp_path / "again", N, seed=7)
    assert again.read_text() == qa.read_text()
    for name in ("00000.mp4", "00007.mp4"):
        a = decode_video(out / name, backend="pyav").frames
        b = decode_video(tmp_path / "again" / name, backend="pyav").frames
        assert np.array_equal(a, b)
    # a prefix does not depend on n; another seed gives other clips
    assert make_shapes(tmp_path / "short", 4, seed=7).read_text().splitlines() == qa.read_text().splitlines()[:4]
    other = make_shapes(tmp_path / "other", 4, seed=8).read_text()
    assert other != "".join(line + "\n" for line in qa.read_text().splitlines()[:4])
    a, b = (shapes.render_clip(np.random.default_rng(5), temporal=True) for _ in range(2))
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.ids, b.ids)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_mp4_decodes_to_the_rendered_frames(dataset, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    out, qa = dataset
    rows = [json.loads(line) for line in qa.read_text().splitlines()]
    for i in (0, 3, 9):
        video = decode_video(out / rows[i]["video"], num_frames=8, backend=backend)
        assert video.backend == backend
        assert video.frames.shape == (shapes.FRAMES, shapes.SIZE, shapes.SIZE, 3) and video.frames.dtype == np.uint8
        assert video.indices == list(range(shapes.FRAMES))
        clip, question, answer = shapes.sample(np.random.default_rng([7, i]), rows[i]["type"])
        assert (question, answer) == (rows[i]["question"], rows[i]["answer"])
        # lossless 4:4:4 H.264: only the RGB <-> YUV rounding is lost
        assert np.abs(video.frames.astype(int) - clip.frames).max() <= 3


def test_objects_never_overlap_and_stay_inside():
    for _, clip, _, _ in _clips():
        n = len(clip.objects)
        assert shapes.MIN_OBJECTS <= n <= shapes.MAX_OBJECTS
        assert len({o.shape for o in clip.objects}) == n and len({o.color for o in clip.objects}) == n
        for f in range(shapes.FRAMES):
            cover = np.zeros((shapes.SIZE, shapes.SIZE), int)
            for o in clip.objects:
                assert 0 <= o.x[f] <= shapes.SIZE - shapes.OBJ and 0 <= o.y[f] <= shapes.SIZE - shapes.OBJ
                cover[o.y[f] : o.y[f] + shapes.OBJ, o.x[f] : o.x[f] + shapes.OBJ] += shapes.SHAPE_MASKS[o.shape]
            assert cover.max() <= 1
        # the objects move
        assert any(np.ptp(o.x) + np.ptp(o.y) > 0 for o in clip.objects)


def _pixel_color(clip, k):
    """Name of the colour nearest (after brightness normalisation) to object k's mean pixel."""
    px = clip.frames[clip.ids == k].astype(float)
    assert len(px) > 0
    mean = px.mean(0) / px.mean(0).max()
    ref = {name: np.array(rgb) / max(rgb) for name, rgb in shapes.COLORS.items()}
    return min(ref, key=lambda name: np.abs(ref[name] - mean).sum())


def test_answers_match_the_rendered_pixels():
    for qtype, clip, question, answer in _clips():
        present = [k for k in range(len(clip.objects)) if (clip.ids == k).any()]
        for k in present:
            assert _pixel_color(clip, k) == clip.objects[k].color
            f = int(np.argmax([(clip.ids[f] == k).any() for f in range(shapes.FRAMES)]))
            o = clip.objects[k]
            crop = clip.ids[f, o.y[f] : o.y[f] + shapes.OBJ, o.x[f] : o.x[f] + shapes.OBJ] == k
            assert np.array_equal(crop, shapes.SHAPE_MASKS[o.shape])
        if qtype == "count":
            assert answer == shapes.COUNT_WORDS[len(present)]
            assert all(o.visible.all() for o in clip.objects)
        elif qtype == "color":
            (k,) = [k for k in present if clip.objects[k].shape in question.split()]
            assert answer == _pixel_color(clip, k)
        elif qtype == "shape":
            (k,) = [k for k in present if clip.objects[k].color in question.split()]
            assert answer == clip.objects[k].shape
        elif qtype in ("first", "second"):
            onset = [int(np.argmax((clip.ids == k).any((1, 2)))) for k in range(len(clip.objects))]
            assert len(present) == len(clip.objects)
            order = np.argsort(onset)
            first = int(order[0])
            assert sorted(onset)[1] > onset[first]  # exactly one object appears first
            assert set(np.unique(clip.ids[onset[first]])) - {-1} == {first}
            if qtype == "first":
                assert answer == _pixel_color(clip, first)
            else:
                second = int(order[1])
                assert len(onset) == 2 or sorted(onset)[2] > onset[second]  # and exactly one second
                assert second in set(np.unique(clip.ids[onset[second]])) and second not in clip.ids[: onset[second]]
                assert answer == _pixel_color(clip, second)


def test_patch_labels_follow_the_masks():
    for _, clip, _, _ in _clips(n=20):
        lab = clip.patch_labels()
        assert lab["color"].shape == (shapes.FRAMES, shapes.GRID**2)
        ids = clip.ids.reshape(shapes.FRAMES, shapes.GRID, shapes.PATCH, shapes.GRID, shapes.PATCH).transpose(
            0, 1, 3, 2, 4
        )
        ids = ids.reshape(shapes.FRAMES, shapes.GRID**2, -1)
        for f in range(shapes.FRAMES):
            for p in range(shapes.GRID**2):
                counts = np.bincount(ids[f, p] + 1, minlength=len(clip.objects) + 1)[1:]
                if counts.max() >= 3:
                    o = clip.objects[int(counts.argmax())]
                    assert lab["has"][f, p]
                    assert lab["color"][f, p] == shapes.COLOR_NAMES.index(o.color) + 1
                    assert lab["shape"][f, p] == shapes.SHAPES.index(o.shape) + 1
                    assert np.all(np.abs(lab["center"][f, p]) <= 1)
                else:
                    assert not lab["has"][f, p] and lab["color"][f, p] == 0 and lab["shape"][f, p] == 0


def test_ask_rejects_unknown_types_and_non_temporal_first():
    clip = shapes.render_clip(np.random.default_rng(0))
    with pytest.raises(ValueError):
        shapes.ask(clip, "direction", np.random.default_rng(0))
    with pytest.raises(ValueError):
        shapes.ask(clip, "first", np.random.default_rng(0))
    q, a = shapes.ask(clip, "describe", np.random.default_rng(0))
    assert q == shapes.AUX_QUESTIONS["describe"]
    assert a.split()[0::2] == sorted((o.color for o in clip.objects), key=shapes.COLOR_NAMES.index)
    q, a = shapes.ask(clip, "describe_shapes", np.random.default_rng(0))
    assert q == shapes.AUX_QUESTIONS["describe_shapes"]
    assert a.split()[0::2] == sorted((o.shape for o in clip.objects), key=shapes.SHAPES.index)
    by_shape = dict(zip(a.split()[0::2], a.split()[1::2], strict=True))
    assert by_shape == {o.shape: o.color for o in clip.objects}


def test_ask_rejects_temporal_questions_without_a_unique_answer():
    clip = shapes.render_clip(np.random.default_rng(1), n_objects=3, temporal=True)
    # 'first' clips allow ties after the first object, so 'second' may be undefined there
    ties = [shapes.render_clip(np.random.default_rng(s), n_objects=4, temporal=True) for s in range(30)]
    undefined = 0
    for c in ties:
        onsets = sorted(int(np.argmax(o.visible)) for o in c.objects)
        if onsets[1] == onsets[2]:
            undefined += 1
            with pytest.raises(ValueError):
                shapes.ask(c, "second", np.random.default_rng(0))
    assert undefined > 0
    assert shapes.ask(clip, "first", np.random.default_rng(0))[1] == clip.objects[0].color
