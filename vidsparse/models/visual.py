"""What a model family hands the engine and the pruning methods: a clip's visual tokens with where
each came from, and the prompt's input embeddings with the map of its visual positions. The engine,
the methods and the statistics read these, never a family's own classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipGrid:
    """A clip's visual tokens as every family lays them out, in Python numbers: `frames` spans one
    after the other, each a summary (CLS) token where `cls`, then `rows` x `cols` patches row by row.
    Methods that plan per frame before layer 0 read the layout here rather than from tensors on the
    model's device, so that planning never waits for the device."""

    frames: int
    rows: int
    cols: int
    cls: bool

    @property
    def per_frame(self) -> int:
        return self.rows * self.cols + int(self.cls)


@dataclass(frozen=True)
class VisualMap:
    """Where the visual tokens sit in the prompt and where each came from in the clip."""

    positions: torch.Tensor  # (n_visual,) sequence indices in the prompt, ascending and consecutive
    # (n_visual,) the time span a token covers: a sampled frame, or for a family whose tokens cover
    # several frames (Qwen2.5-VL: 2), the number of that group of frames; methods that pair or compare
    # frames work on these spans.
    frame: torch.Tensor
    row: torch.Tensor  # (n_visual,) patch row in the token grid, -1 for a summary (CLS) token
    col: torch.Tensor  # (n_visual,) patch column, -1 for a summary (CLS) token
    is_cls: torch.Tensor  # (n_visual,) bool: a summary token of its frame, not a patch
    frames_per_span: int = 1  # sampled frames one span covers

    def __len__(self) -> int:
        return int(self.positions.numel())

    @property
    def start(self) -> int:
        """Sequence index of the first visual token (the map lives on the host: no device sync)."""
        return int(self.positions[0])

    @property
    def end(self) -> int:
        """Sequence index after the last visual token."""
        return int(self.positions[-1]) + 1

    def grid(self) -> ClipGrid:
        """The layout as Python numbers (the map lives on the host: reading it costs no device sync)."""
        return ClipGrid(int(self.frame.max()) + 1, int(self.row.max()) + 1, int(self.col.max()) + 1,
                        bool(self.is_cls.any()))


@dataclass(frozen=True)
class PromptEmbeds:
    """A prompt ready for the decoder. Its *head* is every row up to the end of the video's rows
    (separators such as LLaVA-OneVision's newline included; they are never pruned and are not in
    `visual`); the rows after the head are text, at consecutive positions from `text_start`, the same
    in every RoPE dimension. Decoding continues after the prompt's largest position."""

    input_ids: torch.Tensor  # (1, n)
    embeds: torch.Tensor  # (1, n, d)
    visual: VisualMap  # the prunable visual tokens, a consecutive block of rows inside the head
    rope_positions: torch.Tensor  # (position_dims, 1, n) long: every row's RoPE position, unpruned
    head_length: int  # rows of the head
    # RoPE position of the first row after the head, as the family's HF code places it: the head's
    # largest position + 1 for 1-D RoPE; Qwen2.5-VL (transformers 5.25): the video's first position
    # + its longer side in merged tokens, which sparse sampling can leave below the video's time positions.
    text_start: int
    head_max_position: int  # the largest RoPE position among the head's rows, as a Python number
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
