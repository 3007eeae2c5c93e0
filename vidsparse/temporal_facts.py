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
  is visible).
Linear heads read them; they have their own optimiser and are thrown away with training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidsparse.datasets.shapes import COLOR_NAMES
from vidsparse.pointer_loss import object_pixels

FRAME_LAYER = 0  # the residual after this decoder layer carries the frame index
OBJECT_LAYER = 1  # ... and after this one, the object facts and the colours gone
HEAD_LR = 1e-3
IGNORE = -100


def fact_targets(clips: list, data) -> dict[str, torch.Tensor]:
    """Per visual token of each clip (B, FRAMES * (1 + GRID^2)); IGNORE where a fact has no target.
    ``gone`` is (B, tokens, colours) of 0/1."""
    per_frame = data.GRID**2 + 1
    n = data.FRAMES * per_frame
    frame_of = np.arange(n) // per_frame
    out = {k: np.full((len(clips), n), IGNORE) for k in ("onset", "rank", "moving")}
    gone = np.zeros((len(clips), n, len(COLOR_NAMES)), np.float32)
    for b, clip in enumerate(clips):
        order = sorted(range(len(clip.objects)),
                       key=lambda j: (clip.objects[j].onset, COLOR_NAMES.index(clip.objects[j].color)))
        owner = token_owners(clip.ids, len(clip.objects), data.PATCH)
        for j, obj in enumerate(clip.objects):
            tokens = owner == j
            later = tokens & (frame_of > obj.onset)
            out["onset"][b, tokens] = obj.onset
            out["rank"][b, later] = order.index(j)
            out["moving"][b, later] = int(obj.moving)
            gone[b, frame_of >= obj.offset + 2, COLOR_NAMES.index(obj.color)] = 1.0
    targets = {k: torch.from_numpy(v) for k, v in out.items()}
    targets["frame"] = torch.from_numpy(np.tile(frame_of, (len(clips), 1)))
    targets["gone"] = torch.from_numpy(gone)
    return targets


def token_owners(ids: np.ndarray, n_objects: int, patch: int, min_pixels: int = 4) -> np.ndarray:
    """Per visual token (CLS first in each frame), the object drawing the most of its pixels if that
    is at least ``min_pixels``, else -1 (two objects can share a patch)."""
    counts = np.stack([object_pixels(ids, k, patch) for k in range(n_objects)], -1)  # (tokens, objects)
    return np.where(counts.max(-1) >= min_pixels, counts.argmax(-1), -1)


class TemporalFacts:
    """The heads, the hooks that capture the residuals they read, and the loss (mean over facts)."""

    def __init__(self, model, frames: int, max_objects: int):
        layers = model.model.language_model.layers
        hidden = model.config.text_config.hidden_size
        generator = torch.Generator().manual_seed(0)  # the training's own RNG streams stay untouched
        self.heads = nn.ModuleDict({
            "frame": nn.Linear(hidden, frames), "onset": nn.Linear(hidden, frames),
            "rank": nn.Linear(hidden, max_objects), "moving": nn.Linear(hidden, 2),
            "gone": nn.Linear(hidden, len(COLOR_NAMES)),
        })
        with torch.no_grad():
            for p in self.heads.parameters():
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / hidden**0.5)
        self.heads.to(next(model.parameters()).device)
        self.opt = torch.optim.AdamW(self.heads.parameters(), lr=HEAD_LR)
        self.residual: dict[int, torch.Tensor] = {}
        self.hooks = [layers[i].register_forward_hook(self._capture(i)) for i in (FRAME_LAYER, OBJECT_LAYER)]
        self.accuracy: dict[str, float] = {}  # running means, for the log

    def _capture(self, index: int):
        def hook(module, args, output) -> None:
            self.residual[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def __call__(self, visual: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss on the last forward; ``visual`` marks the video tokens of each sample (B, L)."""
        early = self.residual[FRAME_LAYER][visual].float()
        late = self.residual[OBJECT_LAYER][visual].float()
        losses = []
        for name, x in (("frame", early), ("onset", late), ("rank", late), ("moving", late)):
            target = targets[name].reshape(-1).to(x.device)
            logits = self.heads[name](x)
            losses.append(F.cross_entropy(logits, target, ignore_index=IGNORE))
            seen = target != IGNORE
            self._note(name, (logits[seen].argmax(-1) == target[seen]).float().mean())
        gone = targets["gone"].reshape(-1, len(COLOR_NAMES)).to(x.device)
        logits = self.heads["gone"](late)
        losses.append(F.binary_cross_entropy_with_logits(logits, gone))
        self._note("gone", ((logits > 0).float() == gone).all(-1).float().mean())
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
