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

from collections.abc import Callable
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


def encoder_layer_flops(tokens: int, width: int, mlp: int) -> int:
    """One ViT encoder layer (CLIP's, SigLIP's) on a frame of `tokens` tokens, multiply-add = 1: q/k/v/o
    projections, scores and their weighted sum, and the two MLP matrices."""
    return 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp


def projector_flops(tokens: int, width: int, text_width: int) -> int:
    """The two-layer projector (its input width -> text width -> text width) on `tokens` tokens."""
    return tokens * (width * text_width + text_width * text_width)


class TowerCutter:
    """What every cut tower shares: the layers before the cut on every tower token, then, in groups of
    frames that need equally many tower tokens, the layers after it and the projector on those tokens
    only. A family's subclass says how pixels become the tower's first hidden states (`embed`), which
    tower tokens a kept visual token needs (`needed`: itself, where visual tokens are tower tokens) and
    how projected tower tokens become visual tokens (`assemble`)."""

    def __init__(self, tower: torch.nn.Module, projector: torch.nn.Module, depth: int, tower_tokens: int):
        self.tower, self.projector, self.depth = tower, projector, depth
        self.tower_tokens = tower_tokens  # a frame's tokens in the tower

    def clip_grid(self, frames: int) -> ClipGrid:
        """The layout of a clip's visual tokens (what a first stage chooses from)."""
        raise NotImplementedError

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) pixels -> (T, tower tokens, width): the input of the tower's first layer."""
        raise NotImplementedError

    def needed(self, rows: tuple[int, ...]) -> tuple[int, ...]:
        """The tower tokens (frame-major, ascending) the kept visual tokens `rows` are made of."""
        return rows

    def assemble(self, projected: torch.Tensor) -> torch.Tensor:
        """(T, tower tokens, text width) projected tower tokens, zeros where none was needed -> (T,
        visual tokens a frame, text width)."""
        return projected

    @torch.inference_mode()
    def features(self, pixels: torch.Tensor, cut: TowerCut) -> torch.Tensor:
        """(T, 3, S, S) pixels -> (T, visual tokens a frame, text width) projected tokens, zeros where
        `cut` keeps none (the first stage drops those rows before any layer reads them)."""
        weight = self.tower.embeddings.patch_embedding.weight
        hidden = self.embed(pixels.to(weight.device, weight.dtype))
        layers = self.tower.encoder.layers[: self.depth]
        for layer in layers[: cut.layer]:
            hidden = layer(hidden, None)
        frames, tokens, _ = hidden.shape
        flat = hidden.flatten(0, 1)
        out = hidden.new_zeros(frames * tokens, self.projector.linear_2.out_features)
        for group in frame_groups(self.needed(cut.rows), frames, tokens):
            index = to_device([row for kept in group for row in kept], hidden.device)
            part = flat.index_select(0, index).view(len(group), len(group[0]), -1)
            for layer in layers[cut.layer :]:
                part = layer(part, None)
            out.index_copy_(0, index, self.projector(part).flatten(0, 1))
        visual = self.assemble(out.view(frames, tokens, -1))
        # A token the cut does not keep may share tower tokens with a kept one (pooling): zero it too.
        kept = torch.zeros(visual.shape[0] * visual.shape[1], dtype=torch.bool, device=visual.device)
        kept[to_device(cut.rows, visual.device)] = True
        return visual.masked_fill_(~kept.view(*visual.shape[:2], 1), 0)

    def flops(self, frames: int, cut: TowerCut) -> int:
        """The cut run's FLOPs (multiply-add = 1): the layers before the cut on every tower token, those
        after it and the projector on each frame's needed tokens (pooling, if any, negligible)."""
        config = self.tower.config
        width, mlp = config.hidden_size, config.intermediate_size
        features_in, text_width = self.projector.linear_1.in_features, self.projector.linear_2.out_features
        total = frames * cut.layer * encoder_layer_flops(self.tower_tokens, width, mlp)
        for group in frame_groups(self.needed(cut.rows), frames, self.tower_tokens):
            kept = len(group[0])
            total += len(group) * ((self.depth - cut.layer) * encoder_layer_flops(kept, width, mlp)
                                   + projector_flops(kept, features_in, text_width))
        return total


class ClipTowerCut(TowerCutter):
    """A CLIP ViT tower (patch and position embeddings, pre-LayerNorm, encoder layers) and the
    projector that reads its layer `depth - 1`, as HF runs them for VideoLLaVA: a visual token is a
    tower token (CLS, then grid x grid patches, a frame)."""

    def __init__(self, tower: torch.nn.Module, projector: torch.nn.Module, depth: int, grid: int):
        super().__init__(tower, projector, depth, grid * grid + 1)
        self.grid = grid

    def clip_grid(self, frames: int) -> ClipGrid:
        return ClipGrid(frames, self.grid, self.grid, True)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower.pre_layrnorm(self.tower.embeddings(pixels))


class PooledTowerCut(TowerCutter):
    """A SigLIP tower (no CLS, no pre-norm) whose projected patches are pooled into fewer visual tokens,
    as LLaVA-OneVision's video path does: a kept token needs the patches its pooling reads. `pool`
    ((T, g*g, c) -> (T, p*p, c)) is the family's pooling, read once on a basis to learn which patches
    each token reads; `apply` is HF's own, applied to the projected patches."""

    def __init__(self, tower: torch.nn.Module, projector: torch.nn.Module, depth: int, grid: int,
                 pooled: int, pool: Callable[[torch.Tensor], torch.Tensor],
                 apply: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(tower, projector, depth, grid * grid)
        self.pooled, self.apply = pooled, apply
        weights = pool(torch.eye(grid * grid)[None])[0]  # (p*p, g*g): patch c's weight in token t
        self.reads = [tuple(weights[token].nonzero().flatten().tolist()) for token in range(pooled * pooled)]

    def clip_grid(self, frames: int) -> ClipGrid:
        return ClipGrid(frames, self.pooled, self.pooled, False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower.embeddings(pixels)

    def needed(self, rows: tuple[int, ...]) -> tuple[int, ...]:
        per_frame = self.pooled * self.pooled
        return tuple(sorted({row // per_frame * self.tower_tokens + patch
                             for row in rows for patch in self.reads[row % per_frame]}))

    def assemble(self, projected: torch.Tensor) -> torch.Tensor:
        return self.apply(projected)
