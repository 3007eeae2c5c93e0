"""A vision tower cut by a first stage that chooses from the clip's layout alone (`--tower-cut`).

Why: stprune's and uniform's first stage keeps tokens by their place in the clip, not by their values,
so what it keeps is known before the tower runs, and the tower's work on every other token (and the
projector's) is thrown away before layer 0. A cut runs the tower's layers from `layer` on, and the
projector, on the kept tokens only. At the tower's depth (after its last layer the projector reads)
the kept tokens' features do not change; before it, the kept tokens stop seeing the others in the
layers after the cut, which changes their features: an option, measured on the yardsticks
(docs/methods.md), never the default. The other tokens' rows are zeros: stprune's raters, chosen
against every visual token, are then those of the kept tokens (a zero row adds the same share to
every text row's relevance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidsparse.models.visual import ClipGrid
from vidsparse.transfer import to_device


@dataclass(frozen=True)
class TowerCut:
    """The tower's layers from `layer` on (0-based; the tower's depth: none of them) run on `rows`
    only: ascending indices of the clip's visual tokens (frame-major, as the family lays them out)."""

    layer: int
    rows: tuple[int, ...]


def frame_groups(rows: tuple[int, ...], frames: int, per_frame: int) -> list[list[list[int]]]:
    """`rows` as groups of frames that keep equally many tokens (each frame a batch row of the tower):
    for each group, every frame's kept indices (into the clip, flat), so that a group is one (g, m)
    gather. A frame that keeps nothing is in no group."""
    by_frame: list[list[int]] = [[] for _ in range(frames)]
    for row in rows:
        by_frame[row // per_frame].append(row)
    groups: dict[int, list[list[int]]] = {}
    for kept in by_frame:
        if kept:
            groups.setdefault(len(kept), []).append(kept)
    return list(groups.values())


def clip_layer_flops(tokens: int, width: int, mlp: int) -> int:
    """One CLIP encoder layer on a frame of `tokens` tokens, multiply-add = 1: q/k/v/o projections,
    scores and their weighted sum, and the two MLP matrices."""
    return 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp


def projector_flops(tokens: int, width: int, text_width: int) -> int:
    """The two-layer projector (vision width -> text width -> text width) on `tokens` tokens."""
    return tokens * (width * text_width + text_width * text_width)


class ClipTowerCut:
    """A CLIP ViT tower (patch and position embeddings, pre-LayerNorm, encoder layers) and the
    projector that reads its layer `depth - 1`, run as HF runs them for VideoLLaVA, with a cut."""

    def __init__(self, tower: torch.nn.Module, projector: torch.nn.Module, depth: int, grid: int):
        self.tower, self.projector, self.depth, self.grid = tower, projector, depth, grid

    @property
    def text_width(self) -> int:
        return self.projector.linear_2.out_features

    def clip_grid(self, frames: int) -> ClipGrid:
        """Every frame: CLS, then grid x grid patches."""
        return ClipGrid(frames, self.grid, self.grid, True)

    @torch.inference_mode()
    def features(self, pixels: torch.Tensor, cut: TowerCut) -> torch.Tensor:
        """(T, 3, S, S) pixels -> (T, per frame, text width) projected tokens, zeros where `cut` keeps
        nothing (the first stage drops those rows before any layer reads them)."""
        weight = self.tower.embeddings.patch_embedding.weight
        hidden = self.tower.pre_layrnorm(self.tower.embeddings(pixels.to(weight.device, weight.dtype)))
        layers = self.tower.encoder.layers[: self.depth]
        for layer in layers[: cut.layer]:
            hidden = layer(hidden, None)
        frames, per_frame, _ = hidden.shape
        flat = hidden.flatten(0, 1)
        out = hidden.new_zeros(frames * per_frame, self.text_width)
        for group in frame_groups(cut.rows, frames, per_frame):
            index = to_device([row for kept in group for row in kept], hidden.device)
            part = flat.index_select(0, index).view(len(group), len(group[0]), -1)
            for layer in layers[cut.layer :]:
                part = layer(part, None)
            out.index_copy_(0, index, self.projector(part).flatten(0, 1))
        return out.view(frames, per_frame, -1)

    def flops(self, frames: int, cut: TowerCut) -> int:
        """The cut run's FLOPs (multiply-add = 1): the layers before the cut on every token, those
        after it and the projector on each frame's kept tokens."""
        config = self.tower.config
        width, mlp = config.hidden_size, config.intermediate_size
        per_frame = self.grid * self.grid + 1
        total = frames * cut.layer * clip_layer_flops(per_frame, width, mlp)
        for group in frame_groups(cut.rows, frames, per_frame):
            kept = len(group[0])
            total += len(group) * ((self.depth - cut.layer) * clip_layer_flops(kept, width, mlp)
                                   + projector_flops(kept, width, self.text_width))
        return total
