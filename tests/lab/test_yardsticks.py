"""The ShapesQA-HD training recipes draw the clips they say they draw (lab/yardsticks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_shapes_hd import _masks, _moves, _pixel_color
from vidsparse.datasets import shapes_hd


def test_recipe_n_asks_motion_questions_on_clips_where_still_objects_stay_in_view():
    """With ``p_window=0`` no still object is put down or taken away; recipe N's draw lowers the
    chance for the motion questions only, so that staying in view no longer tells a moving object."""
    from lab.yardsticks import HD

    clips = [shapes_hd.render_clip(np.random.default_rng([12, i]), p_window=0.0) for i in range(20)]
    assert all(o.visible.all() for c in clips for o in c.objects if not o.moving)
    draw = HD.cycles[2].draw  # recipe N's

    def still_in_view(qtype: str) -> float:
        clips = [draw(np.random.default_rng([13, i]), qtype, 4)[0] for i in range(60)]
        return float(np.mean([o.visible.all() for c in clips for o in c.objects if not o.moving]))

    assert still_in_view("moving") > 0.6 and still_in_view("describe_motion") > 0.6
    assert still_in_view("count") < 0.45


@pytest.mark.parametrize("cycle, share", [(5, 0.5), (6, 0.8)])  # recipe Q's, recipe R's
def test_recipes_q_and_r_ask_their_share_of_the_order_questions_on_close_calls(cycle, share):
    """A close call, from the masks: another object's first (for ``disappears``, last) frame is one
    frame from the answer's. Recipe Q's draw asks at least half the order questions on one, recipe
    R's at least 80% (less a sampling margin), more than the data set does, and both draw the other
    types' clips as recipe N's draw does."""
    from lab.yardsticks import HD, _hd_motion_clip, close_call

    def reference(clip, qtype: str, answer: str) -> bool:
        n = len(clip.objects)
        frames = [np.nonzero((clip.ids == k).any((1, 2)))[0] for k in range(n)]
        times = [f[-1] if qtype == "disappears" else f[0] for f in frames]
        (k,) = [k for k in range(n) if _pixel_color(clip, k) == answer]
        return any(abs(times[j] - times[k]) == 1 for j in range(n) if j != k)

    draw = HD.cycles[cycle].draw
    for qtype in ("first", "second", "disappears"):
        drawn = [draw(np.random.default_rng([14, i]), qtype, 4) for i in range(80)]
        natural = [shapes_hd.sample(np.random.default_rng([14, i]), qtype) for i in range(80)]
        close = [close_call(c, qtype, a) for c, _, a in drawn]
        assert close == [reference(c, qtype, a) for c, _, a in drawn]
        natural_close = [close_call(c, qtype, a) for c, _, a in natural]
        assert np.mean(close) >= share - 0.05 and np.mean(close) > np.mean(natural_close) + 0.1
    for qtype in ("count", "moving"):
        clip, q, a = draw(np.random.default_rng([15, 0]), qtype, 4)
        same, q2, a2 = _hd_motion_clip(np.random.default_rng([15, 0]), qtype, 4)
        assert np.array_equal(clip.frames, same.frames) and (q, a) == (q2, a2)


def test_recipe_t_asks_motion_questions_with_as_many_clips_for_every_number_of_movers():
    """Recipe T's draw: with ``share=1`` every number of moving objects, counted from the masks, is
    about as common as any other for the clip's number of objects (the data set's draw makes all of
    them moving rare), the answer is that count, and the other types' clips are recipe R's."""
    from lab.yardsticks import HD, _hd_balanced_movers_clip, _hd_close_call_clip

    drawn = [_hd_balanced_movers_clip(np.random.default_rng([16, i]), "moving", 4, share=1.0) for i in range(300)]
    counts = {n: np.zeros(n + 1) for n in range(shapes_hd.MIN_OBJECTS, shapes_hd.MAX_OBJECTS + 1)}
    for clip, _, answer in drawn:
        n = len(clip.objects)
        movers = sum(_moves(_masks(clip, k)) for k in range(n))
        assert answer == shapes_hd.MOVING_WORDS[movers]
        counts[n][movers] += 1
    for n, seen in counts.items():
        assert seen.sum() > 50 and np.abs(seen / seen.sum() - 1 / (n + 1)).max() < 0.12, (n, seen)
    natural = [shapes_hd.sample(np.random.default_rng([16, i]), "moving")[0] for i in range(300)]

    def all_move(clips) -> float:
        return float(np.mean([all(o.moving for o in c.objects) for c in clips]))

    assert all_move([d[0] for d in drawn]) > all_move(natural) + 0.08
    assert HD.cycles[7].draw is _hd_balanced_movers_clip
    for qtype in ("second", "count"):
        clip, q, a = HD.cycles[7].draw(np.random.default_rng([17, 0]), qtype, 4)
        same, q2, a2 = _hd_close_call_clip(np.random.default_rng([17, 0]), qtype, 4, share=0.8)
        assert np.array_equal(clip.frames, same.frames) and (q, a) == (q2, a2)
