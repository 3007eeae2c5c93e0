"""Random visual-key dropout in training: the HD model learns to answer when some of its video's
tokens are gone, as a pruned prefill leaves it.

Why: the HD model (recipe N) was trained on all 520 tokens only and breaks when any are missing
(tuning clips, seed 515151: dropping a random 10% of the visual tokens before layer 0 takes `moving`
from 0.93 to 0.79 and 25% to 0.62, while the demo model loses nothing at 10%): it reads motion by
comparing each token with the same place one frame back, so a missing predecessor breaks the answer.
A 7B video model has many tokens per object and is not that brittle, so the yardstick's comparison
of pruning methods measured mostly that brittleness (no method kept 90% of its accuracy at 10% of
the tokens). Dropping random tokens is no method's choice, so it favours none.

A dropped token is masked out as a *key* (no other token reads it) from its layer on, which is what
removing it does to every remaining token (kept positions unchanged, as the engine's `keep`); its own
row is still computed and simply not read. Tested against a forward with the tokens removed.
"""

from __future__ import annotations

import numpy as np
import torch

LATER_LAYER = 2  # the second drop acts from this layer on (the in-LLM methods prune after layer 1)


def draw_drops(visual: torch.Tensor, rng: np.random.Generator, share: float, min_keep: float,
               later_keep: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (B, L) masks of the visual tokens dropped from layer 0 on and from ``LATER_LAYER`` on. A
    sample is hit with probability ``share``: a random ``keep`` ~ U(min_keep, 1) of its visual tokens
    survive layer 0 (exactly round(keep n) of them, uniformly chosen); half of the hit samples then
    lose more before ``LATER_LAYER``, down to a random share of at least ``min_keep`` of the clip.
    With ``later_keep`` = (lo, hi) every hit sample loses more there instead, down to a random
    U(lo, hi) share of the clip (at most what survived layer 0): a pruned prefill's regime, where an
    early layer sees many tokens and the rest of the depth a tenth of them."""
    first, later = torch.zeros_like(visual), torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        if rng.random() >= share:
            continue
        positions = visual[b].nonzero().squeeze(1)
        n = positions.numel()
        kept = max(1, round(rng.uniform(min_keep, 1.0) * n))
        order = torch.from_numpy(rng.permutation(n)).to(positions.device)
        first[b, positions[order[kept:]]] = True
        if later_keep is not None:
            kept_later = min(kept, max(1, round(rng.uniform(*later_keep) * n)))
        elif rng.random() < 0.5:
            kept_later = max(1, round(rng.uniform(min_keep * n, kept)))
        else:
            continue
        later[b, positions[order[kept_later:kept]]] = True
    return first, later


class KeyDropout:
    """Hooks on every decoder layer that replace its attention mask while drops are set (``set``);
    without drops the layers run untouched."""

    def __init__(self, model):
        self.first: torch.Tensor | None = None
        self.later: torch.Tensor | None = None
        self.masks: dict[bool, torch.Tensor] = {}  # this forward's two masks: before / from LATER_LAYER
        self.hooks = [layer.register_forward_pre_hook(self._mask(i), with_kwargs=True)
                      for i, layer in enumerate(model.model.language_model.layers)]

    def set(self, first: torch.Tensor | None, later: torch.Tensor | None = None) -> None:
        """Drops for the next forward (``draw_drops``' masks), or None for none."""
        none = first is None or not (first.any() or (later is not None and later.any()))
        self.first, self.later = (None, None) if none else (first, later)
        self.masks = {}

    def _mask(self, index: int):
        def hook(module, args, kwargs):
            if self.first is None:
                return None
            late = self.later is not None and index >= LATER_LAYER
            if late not in self.masks:
                self.masks[late] = self._build(self.first | self.later if late else self.first,
                                               args[0] if args else kwargs["hidden_states"],
                                               kwargs.get("attention_mask"))
            kwargs["attention_mask"] = self.masks[late]
            return args, kwargs
        return hook

    @staticmethod
    def _build(dropped: torch.Tensor, hidden: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        """The additive (B, 1, L, L) mask: causal, ``dropped`` never a key, and HF's own padding mask."""
        length = hidden.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        allowed = causal[None] & ~dropped[:, None, :]  # (B, query, key)
        if given is not None:  # a padding mask HF already made 4-D (bool, or additive floats)
            allowed = allowed & (given[:, 0] if given.dtype == torch.bool else given[:, 0] == 0)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        return mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
