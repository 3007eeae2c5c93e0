"""Text-agnostic baselines that prune before layer 0 (SPEC section 5): random and uniform."""

from __future__ import annotations

import torch

from vidsparse.pruning.base import BeforeFirstLayer, Method, Selection, StageInput, top_k


class NoPruning(Method):
    name = "none"
    summary = "vanilla VideoLLaVA: every visual token through every layer"
    allows_prune_after = False

    def default_stages(self, num_layers: int) -> list[int]:
        return []


class RandomPruning(BeforeFirstLayer):
    name = "random"
    summary = "B visual tokens drawn uniformly at random (seeded), before layer 0"

    def select(self, stage: StageInput) -> Selection:
        scores = torch.rand(stage.frames.numel(), generator=stage.generator).to(stage.frames.device)
        return Selection(top_k(scores, stage.budget, stage.frames, stage.min_per_frame))


class UniformPruning(BeforeFirstLayer):
    name = "uniform"
    summary = "an equal share of B per frame (remainder to the earliest), a strided grid inside each frame"

    def select(self, stage: StageInput) -> Selection:
        frame_ids, counts = stage.frames.unique_consecutive(return_counts=True)
        share, extra = divmod(stage.budget, len(frame_ids))
        keep, start = [], 0
        for f, count in enumerate(counts.tolist()):
            want = min(count, share + (1 if f < extra else 0))
            keep.append(start + strided(count, want).to(stage.frames.device))
            start += count
        return Selection(torch.cat(keep))


def strided(count: int, want: int) -> torch.Tensor:
    """`want` of a frame's `count` tokens (CLS first, then patches row-major): the centres of
    `want` equal strides over the patches; CLS only when every patch is already taken."""
    patches = count - 1
    if want > patches:
        return torch.arange(count)
    return 1 + ((torch.arange(want) * 2 + 1) * patches) // (2 * want)
