"""Dense per-token temporal facts: an auxiliary loss that teaches the ShapesQA-HD decoder when each
visual token is and what its object does over the clip, so that the temporal questions can be learnt.

Why: trained on answers alone, the HD model (recipe J, QA step 1750) had learnt colour and shape
(1.00) but nothing about time: on the "describe the times ?" answers ("red zero five": each object's
first and last frame) it predicted the onset as often as always saying "zero" does (0.65 / 0.65)
and the offset as often as "seven" (0.77 / 0.76), whether an object moves at chance (0.60 / 0.50),
and first / second / disappears stayed at 0.42 / 0.54 / 0.29 for 1000 steps. A linear probe read a
visual token's frame index from its residual 0.16-0.43 of the time (8 frames): RoPE puts position
into attention scores, not into what attention carries, so a head that finds the red object's
tokens learns nothing about *when* they are. Weighting the temporal questions up (120 steps) or a
frame-index loss alone (200 steps; the probe rose to 0.94) changed none of it. With a first version
of this loss (frame index after layer 0; the token's object's onset, order of appearance with ties
and motion after layer 1; no ``gone``) "first" rose from 0.60 to 0.83 in 100 steps: once every
token of an object carries its object's facts, a question reads them from any of its tokens, as it
reads the colour.

The targets are what a causal decoder can know at that token (it sees its own and earlier frames):
- ``frame``: the token's frame index (every visual token, after layer ``FRAME_LAYER``);
- ``onset``: the first frame its object is visible in (object tokens, after ``OBJECT_LAYER``);
- ``rank``: its object's place in the order of appearance, ties broken by colour (object tokens
  in frames after the onset, when every object that appeared with it has been seen whole);
- ``moving``: whether its object moves (object tokens after the onset: two frames to compare);
- ``gone``: per colour, whether an object of that colour was last seen two or more frames earlier
  (every visual token, after ``OBJECT_LAYER``: the previous frame is complete, so its absence there
  is visible);
- ``present``: per colour, whether it is visible in the token's frame (the last token of each
  frame, the first to have seen the whole frame; after ``FRAME_LAYER``);
- ``vanished``: per colour, visible in the previous frame and not in this one (the last token of
  each frame, after ``OBJECT_LAYER``: one look back at the previous frame's ``present``);
- ``changed``: whether the token's patch changed since the previous frame (4 or more of its pixels
  drawn by another object or the background; no target for 1-3 or for patches with no object in
  either frame), after ``OBJECT_LAYER``: one look at the same place one frame back;
- ``moved``: per colour, visible in the previous frame and in this one, and moving (the last token
  of each frame, after ``MOTION_LAYER``: its frame's changed tokens of a colour already there);
- ``seen``: per colour, visible in this or an earlier frame (the last token of each frame, after
  ``MOTION_LAYER``: a count over the clip is the number of colours on the last frame's last token).
``gone`` stayed at what answering "nothing gone" scores (0.86) for 800 steps of recipe K: every
token had to gather every colour's last frame. ``present`` and ``vanished`` ask one token a frame
for one comparison each, and "which color disappears first ?" becomes a single lookup: the earliest
frame whose last token saw a colour vanish.
``moving`` learnt a shortcut: recipe M's model (QA step 4500) said "moves" for 91% of the moving
objects and for 86% of the still objects visible in all eight frames (still ones are usually put
down or taken away, moving ones usually stay in view), so its heads and answers read how long an
object is in view, not whether it moves. ``changed`` has no such shortcut: only the look back
answers it.
Linear heads read them; they have their own optimiser and are thrown away with training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lab.pointer_loss import object_pixels
from vidsparse.datasets.shapes import COLOR_NAMES

FRAME_LAYER = 0  # the residual after this decoder layer carries the frame index
OBJECT_LAYER = 1  # ... and after this one, the object facts and the colours gone
MOTION_LAYER = 2  # ... and after this one, each frame's colours moved and the colours seen so far
ORDER_LAYER = 3  # ... and after this one, the order of events so far
CHANGE_PIXELS = 4  # a patch changed when at least this many of its pixels are drawn differently
HEAD_LR = 1e-3
IGNORE = -100


def fact_targets(clips: list, data) -> dict[str, torch.Tensor]:
    """Per visual token of each clip (B, FRAMES * (1 + GRID^2)); IGNORE where a fact has no target.
    The per-colour facts (``gone``, ``present``, ``vanished``, ``moved``, ``seen``) are (B, tokens,
    colours) of 0/1, with IGNORE in every colour of a token without a target."""
    per_frame = data.GRID**2 + 1
    n = data.FRAMES * per_frame
    frame_of = np.arange(n) // per_frame
    last = np.arange(data.FRAMES) * per_frame + per_frame - 1  # each frame's last token
    out = {k: np.full((len(clips), n), IGNORE) for k in ("onset", "rank", "moving", "changed", *ORDER_FACTS)}
    colours = len(COLOR_NAMES)
    gone = np.zeros((len(clips), n, colours), np.float32)
    per_frame_last = {k: np.full((len(clips), n, colours), IGNORE, np.float32)
                      for k in ("present", "vanished", "moved", "seen")}
    present, vanished = per_frame_last["present"], per_frame_last["vanished"]
    for b, clip in enumerate(clips):
        order = sorted(range(len(clip.objects)),
                       key=lambda j: (clip.objects[j].onset, COLOR_NAMES.index(clip.objects[j].color)))
        owner = token_owners(clip.ids, len(clip.objects), data.PATCH)
        shown = np.zeros((data.FRAMES, colours), np.float32)
        moves = np.zeros(colours, np.float32)
        for j, obj in enumerate(clip.objects):
            tokens = owner == j
            later = tokens & (frame_of > obj.onset)
            out["onset"][b, tokens] = obj.onset
            out["rank"][b, later] = order.index(j)
            out["moving"][b, later] = int(obj.moving)
            gone[b, frame_of >= obj.offset + 2, COLOR_NAMES.index(obj.color)] = 1.0
            shown[:, COLOR_NAMES.index(obj.color)] = obj.visible
            moves[COLOR_NAMES.index(obj.color)] = obj.moving
        present[b, last] = shown
        vanished[b, last[0]] = 0.0  # nothing has vanished in the first frame
        vanished[b, last[1:]] = shown[:-1] * (1 - shown[1:])
        per_frame_last["moved"][b, last[0]] = 0.0  # nothing has been seen moving in the first frame
        per_frame_last["moved"][b, last[1:]] = shown[:-1] * shown[1:] * moves
        per_frame_last["seen"][b, last] = np.maximum.accumulate(shown, axis=0)
        out["changed"][b] = patch_changes(clip.ids, data.PATCH)
        for name, value in order_so_far(clip.objects, data.FRAMES).items():
            out[name][b, last] = value
    targets = {k: torch.from_numpy(v) for k, v in out.items()}
    targets["frame"] = torch.from_numpy(np.tile(frame_of, (len(clips), 1)))
    targets["gone"] = torch.from_numpy(gone)
    targets.update({k: torch.from_numpy(v) for k, v in per_frame_last.items()})
    return targets


ORDER_FACTS = ("first_on", "second_on", "first_off")


def order_so_far(objects, frames: int) -> dict[str, np.ndarray]:
    """Per frame, the colour index of the object that appeared first (``first_on``) and second
    (``second_on``) and that disappeared first (``first_off``) among the events up to that frame;
    ``len(COLOR_NAMES)`` while there is none yet, IGNORE while it is a tie (as the questions, which
    are asked only when it is unique). Once set a value never changes: later events come later."""
    none = len(COLOR_NAMES)
    colour = [COLOR_NAMES.index(o.color) for o in objects]
    out = {name: np.full(frames, IGNORE) for name in ORDER_FACTS}
    for t in range(frames):
        onsets = [(o.onset, c) for o, c in zip(objects, colour, strict=True) if o.onset <= t]
        offsets = [(o.offset, c) for o, c in zip(objects, colour, strict=True) if o.offset < t]
        for name, events, rank in (("first_on", onsets, 0), ("second_on", onsets, 1), ("first_off", offsets, 0)):
            times = sorted(time for time, _ in events)
            if len(times) <= rank:
                out[name][t] = none
            elif times.count(times[rank]) == 1:
                out[name][t] = next(c for time, c in events if time == times[rank])
    return out


def patch_changes(ids: np.ndarray, patch: int) -> np.ndarray:
    """Per visual token (CLS first in each frame): 1 where at least ``CHANGE_PIXELS`` of its patch's
    pixels are drawn by another object (or the background) than in the previous frame, 0 where none
    are, ``IGNORE`` in between, in the first frame, on CLS and where no object is drawn in the patch
    in either frame."""
    frames, size, _ = ids.shape
    grid = size // patch
    cells = ids.reshape(frames, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4).reshape(frames, grid * grid, -1)
    differ = (cells[1:] != cells[:-1]).sum(-1)
    drawn = (cells[1:] >= 0).any(-1) | (cells[:-1] >= 0).any(-1)
    label = np.where(differ >= CHANGE_PIXELS, 1, np.where(differ == 0, 0, IGNORE))
    out = np.full((frames, grid * grid + 1), IGNORE)
    out[1:, 1:] = np.where(drawn, label, IGNORE)
    return out.reshape(-1)


def token_owners(ids: np.ndarray, n_objects: int, patch: int, min_pixels: int = 4) -> np.ndarray:
    """Per visual token (CLS first in each frame), the object drawing the most of its pixels if that
    is at least ``min_pixels``, else -1 (two objects can share a patch)."""
    counts = np.stack([object_pixels(ids, k, patch) for k in range(n_objects)], -1)  # (tokens, objects)
    return np.where(counts.max(-1) >= min_pixels, counts.argmax(-1), -1)


# name -> (the layer whose output it is read from, its classes, per-colour 0/1 rather than one class)
FACTS = {
    "frame": (FRAME_LAYER, "frames", False),
    "onset": (OBJECT_LAYER, "frames", False),
    "rank": (OBJECT_LAYER, "objects", False),
    "moving": (OBJECT_LAYER, 2, False),
    "gone": (OBJECT_LAYER, "colours", True),
    "present": (FRAME_LAYER, "colours", True),
    "vanished": (OBJECT_LAYER, "colours", True),
    "changed": (OBJECT_LAYER, 2, False),
    "moved": (MOTION_LAYER, "colours", True),
    "seen": (MOTION_LAYER, "colours", True),
    **dict.fromkeys(ORDER_FACTS, (ORDER_LAYER, "colours or none", False)),
}
PHASE_FACTS = ("frame", "onset", "rank", "moving", "gone")  # recipe K's temporal phase


class TemporalFacts:
    """The heads of the facts ``names``, the hooks that capture the residuals they read, and the loss
    (mean over those facts)."""

    def __init__(self, model, frames: int, max_objects: int, names: tuple[str, ...] = PHASE_FACTS):
        layers = model.model.language_model.layers
        hidden = model.config.text_config.hidden_size
        sizes = {"frames": frames, "objects": max_objects, "colours": len(COLOR_NAMES),
                 "colours or none": len(COLOR_NAMES) + 1}
        self.names = tuple(name for name in FACTS if name in names)  # one order, whatever the caller's
        generator = torch.Generator().manual_seed(0)  # the training's own RNG streams stay untouched
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, sizes.get(FACTS[name][1], FACTS[name][1]))
                                    for name in self.names})
        with torch.no_grad():
            for p in self.heads.parameters():
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / hidden**0.5)
        self.heads.to(next(model.parameters()).device)
        self.opt = torch.optim.AdamW(self.heads.parameters(), lr=HEAD_LR)
        self.residual: dict[int, torch.Tensor] = {}
        self.layers = sorted({FACTS[name][0] for name in self.names})
        self.hooks = [layers[i].register_forward_hook(self._capture(i)) for i in self.layers]
        self.accuracy: dict[str, float] = {}  # running means, for the log

    def _capture(self, index: int):
        def hook(module, args, output) -> None:
            self.residual[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def __call__(self, visual: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss on the last forward; ``visual`` marks the video tokens of each sample (B, L)."""
        read = {i: self.residual[i][visual].float() for i in self.layers}
        losses = []
        for name in self.names:
            layer, _, per_colour = FACTS[name]
            x, target = read[layer], targets[name].to(read[layer].device)
            if per_colour:
                target = target.reshape(-1, target.shape[-1])
                seen = target[:, 0] != IGNORE
                logits = self.heads[name](x[seen])
                losses.append(F.binary_cross_entropy_with_logits(logits, target[seen]))
                self._note(name, ((logits > 0).float() == target[seen]).all(-1).float().mean())
            else:
                target = target.reshape(-1)
                logits = self.heads[name](x)
                losses.append(F.cross_entropy(logits, target, ignore_index=IGNORE))
                seen = target != IGNORE
                self._note(name, (logits[seen].argmax(-1) == target[seen]).float().mean())
        return torch.stack(losses).mean()

    def _note(self, name: str, accuracy: torch.Tensor) -> None:
        value = accuracy.item()
        self.accuracy[name] = value if name not in self.accuracy else 0.95 * self.accuracy[name] + 0.05 * value

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "opt": self.opt.state_dict(), "accuracy": self.accuracy}

    def load_state_dict(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["opt"])
        self.accuracy = dict(state["accuracy"])

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
