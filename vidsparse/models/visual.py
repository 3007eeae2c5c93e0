"""What a model family hands the engine and the pruning methods: a clip's visual tokens with where
each came from, and the prompt's input embeddings with the map of its visual positions. The engine,
the methods and the statistics read these, never a family's own classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisualMap:
    """Where the visual tokens sit in the prompt and where each came from in the clip."""

    positions: torch.Tensor  # (n_visual,) sequence positions, ascending
    frame: torch.Tensor  # (n_visual,) sampled-frame number
    row: torch.Tensor  # (n_visual,) patch row, -1 for the CLS token
    col: torch.Tensor  # (n_visual,) patch column, -1 for the CLS token
    is_cls: torch.Tensor  # (n_visual,) bool

    def __len__(self) -> int:
        return int(self.positions.numel())


@dataclass(frozen=True)
class PromptEmbeds:
    input_ids: torch.Tensor  # (1, n)
    embeds: torch.Tensor  # (1, n, d)
    visual: VisualMap
    suffix_words: list[str]  # the tokens after the visual block (question and template), as text
    saliency: torch.Tensor | None = None  # (n_visual,) VideoFeatures.cls_attention, flattened
    frame_features: torch.Tensor | None = None  # (frames, d_vision) VideoFeatures.frame_embedding


@dataclass(frozen=True)
class VideoFeatures:
    """The video tower's output for a clip, and what some pruning methods read from inside the tower."""

    tokens: torch.Tensor  # (T, tokens_per_frame, d) projected visual tokens
    # At the layer whose output feeds the projector: the CLS query's attention over the frame's
    # tokens (head-averaged, CLS column included), and the CLS state after the tower's final norm.
    cls_attention: torch.Tensor | None = None  # (T, tokens_per_frame)
    frame_embedding: torch.Tensor | None = None  # (T, d_vision)
