"""The temporal-facts targets equal the definitions recomputed from the renderer's id masks, token by
token, and the loss reads the residuals of the layers it names (captured during the model's forward)."""

from __future__ import annotations

import numpy as np
import torch

from lab.temporal_facts import FACTS, IGNORE, TemporalFacts, fact_targets
from lab.train_demo import build
from lab.yardsticks import HD
from vidsparse.datasets import shapes_hd
from vidsparse.datasets.shapes import COLOR_NAMES


def _reference(clip) -> dict[str, list]:
    """Token by token from ``clip.ids``: CLS first in each frame, then patches row-major; a patch
    belongs to the object drawing most of its pixels, if at least 4."""
    frames, patch, grid = shapes_hd.FRAMES, shapes_hd.PATCH, shapes_hd.GRID
    shown = [[bool((clip.ids[f] == k).any()) for f in range(frames)] for k in range(len(clip.objects))]
    onset = [s.index(True) for s in shown]
    offset = [frames - 1 - s[::-1].index(True) for s in shown]
    colour = [COLOR_NAMES.index(o.color) for o in clip.objects]
    ranked = sorted(range(len(clip.objects)), key=lambda k: (onset[k], colour[k]))
    out = {name: [] for name in ("frame", "onset", "rank", "moving", "gone", "present", "vanished", "changed",
                                 "moved", "seen", "first_on", "second_on", "first_off")}
    colours = range(len(COLOR_NAMES))
    in_frame = [{colour[k] for k in range(len(clip.objects)) if shown[k][f]} for f in range(frames)]
    moves = {colour[k] for k in range(len(clip.objects)) if clip.objects[k].moving}
    for f in range(frames):
        for t in range(grid * grid + 1):
            owner, changed = None, IGNORE
            if t > 0:
                r, c = divmod(t - 1, grid)
                cell = clip.ids[f, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                drawn = [(cell == k).sum() for k in range(len(clip.objects))]
                owner = int(np.argmax(drawn)) if max(drawn) >= 4 else None
                before = clip.ids[f - 1, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] if f > 0 else None
                if before is not None and ((cell >= 0).any() or (before >= 0).any()):
                    differ = int((cell != before).sum())
                    changed = 1 if differ >= 4 else 0 if differ == 0 else IGNORE
            out["changed"].append(changed)
            out["frame"].append(f)
            out["onset"].append(IGNORE if owner is None else onset[owner])
            after = owner is not None and f > onset[owner]
            out["rank"].append(ranked.index(owner) if after else IGNORE)
            out["moving"].append(int(clip.objects[owner].moving) if after else IGNORE)
            out["gone"].append([float(any(colour[k] == c and f >= offset[k] + 2 for k in range(len(clip.objects))))
                                for c in range(len(COLOR_NAMES))])
            if t < grid * grid:  # only the last token of a frame has seen all of it
                for name in ("present", "vanished", "moved", "seen"):
                    out[name].append([IGNORE] * len(colours))
                for name in ("first_on", "second_on", "first_off"):
                    out[name].append(IGNORE)
                continue
            appeared = [k for k in range(len(clip.objects)) if onset[k] <= f]
            out["first_on"].append(_earliest(appeared, onset, colour))
            if len(appeared) < 2:
                out["second_on"].append(len(COLOR_NAMES))
            else:
                first = _earliest(appeared, onset, colour)
                rest = [k for k in appeared if colour[k] != first]
                out["second_on"].append(IGNORE if first == IGNORE else _earliest(rest, onset, colour))
            out["first_off"].append(_earliest([k for k in range(len(clip.objects)) if offset[k] < f], offset, colour))
            out["present"].append([float(c in in_frame[f]) for c in colours])
            out["vanished"].append([float(f > 0 and c in in_frame[f - 1] and c not in in_frame[f]) for c in colours])
            out["moved"].append([float(f > 0 and c in in_frame[f - 1] and c in in_frame[f] and c in moves)
                                 for c in colours])
            out["seen"].append([float(any(c in in_frame[g] for g in range(f + 1))) for c in colours])
    return out


def _earliest(objects: list[int], time: list[int], colour: list[int]) -> int:
    """The colour of the one object of ``objects`` with the earliest ``time``; "none" (the colour
    count) for no object, IGNORE for a tie."""
    if not objects:
        return len(COLOR_NAMES)
    earliest = [k for k in objects if time[k] == min(time[j] for j in objects)]
    return colour[earliest[0]] if len(earliest) == 1 else IGNORE


def test_fact_targets_follow_their_definitions():
    clips = [shapes_hd.sample(np.random.default_rng([5, i]), q, 4)[0]
             for i, q in enumerate(["disappears", "first", "moving", "count", "second"])]
    # and clips with ties: two objects appearing first together, two disappearing first together
    drawn = [shapes_hd.render_clip(np.random.default_rng([7, i])) for i in range(400)]
    clips += [next(c for c in drawn if sorted(o.onset for o in c.objects)[:2] == [0, 0]),
              next(c for c in drawn if min(o.offset for o in c.objects) < shapes_hd.FRAMES - 1
                   and [o.offset for o in c.objects].count(min(o.offset for o in c.objects)) == 2)]
    # and a clip where a moving object enters the frame (not yet seen moving in its first frame)
    entering = (shapes_hd.render_clip(np.random.default_rng([6, i])) for i in range(1000))
    clips.append(next(c for c in entering if any(o.moving and o.onset > 0 for o in c.objects)))
    targets = fact_targets(clips, shapes_hd)
    for b, clip in enumerate(clips):
        expected = _reference(clip)
        for name, values in expected.items():
            assert targets[name][b].tolist() == values, name
    rank = targets["rank"][targets["rank"] != IGNORE]
    assert rank.max() >= 1 and targets["gone"].sum() > 0 and (targets["moving"] == 1).any()
    assert (targets["vanished"] == 1).any() and (targets["present"] == 0).any()
    assert (targets["changed"] == 1).any() and (targets["changed"] == 0).any() and (targets["changed"] == IGNORE).any()
    assert (targets["moved"] == 1).any() and (targets["seen"] == 0).any()
    for name in ("first_on", "second_on", "first_off"):  # a colour, "none" and a tie each occur
        assert set(targets[name].unique().tolist()) > {IGNORE, len(COLOR_NAMES)}, name


def test_the_loss_reads_the_residual_after_its_layers():
    torch.manual_seed(0)
    _, model = build(HD, torch.device("cpu"))
    facts = TemporalFacts(model, shapes_hd.FRAMES, shapes_hd.MAX_OBJECTS, tuple(FACTS))
    clip = shapes_hd.sample(np.random.default_rng(3), "first", 4)[0]
    n = shapes_hd.FRAMES * (shapes_hd.GRID**2 + 1)
    embeds = torch.randn(1, n + 3, model.config.text_config.hidden_size)
    visual = torch.zeros(1, n + 3, dtype=torch.bool)
    visual[0, 1:n + 1] = True
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=embeds, output_hidden_states=True)
        loss = facts(visual, fact_targets([clip], shapes_hd))
        # hidden_states[i + 1] is the residual after layer i
        facts.residual = {i: out.hidden_states[i + 1] for i in range(4)}
        assert torch.allclose(loss, facts(visual, fact_targets([clip], shapes_hd)))
        facts.residual = {i: out.hidden_states[i + 2] for i in range(4)}
        assert not torch.allclose(loss, facts(visual, fact_targets([clip], shapes_hd)))
    facts.close()
