"""The contract a model family fulfils: the only code that knows a family's classes, prompt template,
preprocessing, vision tower and the layout and positions of its visual tokens.

The engine, the pruning methods, the statistics and batch/sweep/Ray work on what a family returns
(`VideoFeatures`, `PromptEmbeds` with its `VisualMap` and RoPE positions) and on its text decoder,
whose layers all families share the shape of (input_layernorm, q/k/v/o projections, post-attention
norm, MLP; `rotary_emb(hidden, position_ids)`). A family is one module with a `VideoModel`
subclass, registered by one line in `vidsparse.models.families`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from vidsparse.errors import UserError
from vidsparse.models.tower_cut import TowerCutter
from vidsparse.models.visual import PromptEmbeds, VideoFeatures

VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"  # where transformers 5 saves a video processor


@dataclass(frozen=True)
class ClipShape:
    """What a family needs to know of a clip to lay out its tokens: sampled frames and their size."""

    frames: int
    height: int
    width: int
    fps: float | None = None  # sampled frames a second of video (M-RoPE ties time positions to seconds)


def positive_integers(part: tuple[str, PretrainedConfig], *keys: str) -> list[str]:
    """One line for each of `keys` of a config part (named, value) that is not a positive integer: the
    sizes every count and FLOP formula divides or multiplies by."""
    name, values = part
    return [f"{name}.{key} is {value!r}, must be a positive integer" for key in keys
            if not isinstance(value := getattr(values, key, None), int) or isinstance(value, bool) or value < 1]


def refuse_too_long(limit: int, frames: int, video_rows: int, max_new_tokens: int, text_tokens: int | None = None
                    ) -> None:
    """Raise the UserError that says how to fit `frames` frames (`video_rows` rows), the text and the
    answer into `limit` positions, if they do not fit."""
    counted = text_tokens or 0
    needed = video_rows + counted + max_new_tokens
    if needed <= limit:
        return
    frames_that_fit = int((limit - counted - max_new_tokens) // (video_rows / frames))
    if frames_that_fit >= 1 and text_tokens is None:
        remedy = (f"sample fewer --frames ({frames_that_fit} would leave no room for the prompt's text; with "
                  "--fps, lower --max-frames), or lower --max-new-tokens")
    elif frames_that_fit >= 1:
        remedy = (f"sample at most {frames_that_fit} frames (--frames, or --max-frames with --fps), or lower "
                  "--max-new-tokens")
    else:
        remedy = "shorten the question" if counted >= limit // 2 else "lower --max-new-tokens"
    text = "the prompt's text" if text_tokens is None else f"{text_tokens} text tokens"
    raise UserError(f"the prompt plus answer needs {'more than ' * (text_tokens is None)}{needed} positions "
                    f"({frames} frames -> {video_rows} visual tokens, {text}, {max_new_tokens} new "
                    f"tokens) but the model has {limit}: {remedy}")


def _ids(value: int | list[int] | None) -> set[int | None]:
    return set(value) if isinstance(value, list) else {value}


class VideoModel:
    """A loaded checkpoint of one family: its HF model, tokenizer and the steps from frames to a
    prompt's embeddings. Subclasses set the class attributes and implement the methods that raise
    NotImplementedError; the rest is shared."""

    model_type: ClassVar[str]  # config.json's model_type
    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]
    position_dims: ClassVar[int] = 1  # 1: 1-D RoPE positions; 3: M-RoPE (time, height, width)

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 mean: Sequence[float], std: Sequence[float], video_processor: dict | None = None):
        """`video_processor`: the checkpoint's video_preprocessor_config.json, if it has one (a family that
        sizes frames by it reads it; the others ignore it)."""
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.mean, self.std = tuple(mean), tuple(std)
        # The answer ends at any of the decoder's, the tokenizer's or generation_config.json's end tokens
        # (Qwen2 checkpoints list <|endoftext|> beside <|im_end|> there, and HF generate stops on both).
        generation = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_token_ids: set[int] = ({tokenizer.eos_token_id} | _ids(self.text_config.eos_token_id)
                                        | _ids(generation)) - {None}

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "auto", device: str = "auto") -> VideoModel:
        """Load a checkpoint of this family from a hub id, an alias or a local folder."""
        from vidsparse.models.loading import load_family

        return load_family(None if cls is VideoModel else cls, name_or_path, dtype, device)

    @classmethod
    def default_pixel_stats(cls) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the family's processor, for a checkpoint without preprocessor_config.json."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> list[str]:
        """What is wrong with a loaded config for this family (empty if nothing): one line each. The
        decoder's sizes here; a family adds its tower's (`positive_integers`)."""
        text = config.text_config
        return positive_integers(("text_config", text), "num_hidden_layers", "max_position_embeddings", "hidden_size",
                                 "num_attention_heads")

    @classmethod
    def placeholder(cls, config: PretrainedConfig) -> tuple[str, int]:
        """The prompt's video placeholder as text and its token id (the tokenizer must agree)."""
        raise NotImplementedError

    @classmethod
    def unused_weights(cls) -> tuple[str, ...]:
        """Parts of the HF model a video question never runs (dropped after loading; a checkpoint may
        lack them): substrings of their parameter names."""
        return ()

    def drop_unused(self) -> None:
        """Release what a run never reads: the parts named by `unused_weights` (e.g. VideoLLaVA's image
        tower), and layers whose output nothing reads (VideoLLaVA's video tower past its projector's)."""

    # -- what the engine runs --------------------------------------------------------------------

    @property
    def text_config(self) -> PretrainedConfig:
        return self.model.config.text_config

    @property
    def decoder(self):
        """The text decoder (embed_tokens, layers, norm, rotary_emb)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # -- the family's own steps ------------------------------------------------------------------

    def visual_tokens(self, clip: ClipShape) -> int:
        """Visual tokens (prunable ones: no separators) a clip of this shape becomes."""
        raise NotImplementedError

    def spans(self, clip: ClipShape) -> int:
        """Time spans a clip's visual tokens fall into (`VisualMap.frame`): one a frame unless a token
        covers several frames."""
        return clip.frames

    def prompt_overhead(self, clip: ClipShape) -> int:
        """Prompt rows of the video that are not prunable visual tokens (separators, newlines)."""
        return 0

    @classmethod
    def fewest_video_rows(cls, config: PretrainedConfig, frames: int) -> int:
        """The fewest prompt rows `frames` frames can become, from the config alone (before the
        checkpoint's processor settings are read): what is checked before anything is loaded."""
        raise NotImplementedError

    def seen_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (T, H, W, 3) frames -> float (T, 3, h, w) values 0..255: the frames as the tower sees
        them (resized, cropped; not normalised), for pictures of what pruning kept."""
        raise NotImplementedError

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (T, H, W, 3) frames -> what `video_features` takes (the family's pixel format)."""
        raise NotImplementedError

    def prompt_ids(self, question: str, clip: ClipShape) -> torch.Tensor:
        """(1, n) token ids of the family's chat prompt with the video's placeholders expanded."""
        raise NotImplementedError

    def video_features(self, pixels: torch.Tensor, saliency: bool = False) -> VideoFeatures:
        """The tower and projector; with `saliency`, also what vidcom2/fastvid/dycoke read inside it."""
        raise NotImplementedError

    @classmethod
    def tower_cut_depth(cls, config: PretrainedConfig) -> int | None:
        """The tower layers a checkpoint's projector reads, where the family can cut its tower
        (`--tower-cut`, `tower_cutter`); None: it cannot. Raises the UserError of a checkpoint whose
        projector reads several layers."""
        return None

    @classmethod
    def check_tower_cut(cls, config: PretrainedConfig, layer: int) -> None:
        """Refuse a cut this checkpoint's tower cannot take (checked from its config, before loading)."""
        depth = cls.tower_cut_depth(config)
        if depth is None:
            raise UserError(f"--tower-cut: {cls.model_type}'s vision tower cannot be cut yet (VideoLLaVA's and "
                            "LLaVA-OneVision's can)")
        if layer > depth:
            raise UserError(f"--tower-cut {layer}: this model's projector reads the output of its tower's layer "
                            f"{depth - 1}: give a layer from 0 to {depth} (the tower's depth: after it)")

    def tower_cutter(self) -> TowerCutter:
        """The family's tower and projector as a cut runs them, for a family with a `tower_cut_depth`."""
        raise NotImplementedError

    def hf_video_inputs(self, pixels: torch.Tensor, input_ids: torch.Tensor, clip: ClipShape) -> dict:
        """What the family's HF model takes for the video of a batch of prompts (`input_ids` (b, n)) about
        clips of this shape (`pixels`: `preprocess`'s output of each, stacked): what trains it and what
        its HF `generate` is compared with."""
        return {"pixel_values_videos": pixels}

    def embed(self, input_ids: torch.Tensor, video: VideoFeatures, clip: ClipShape) -> PromptEmbeds:
        """The prompt's input embeddings with the visual features in place, the map of its visual
        tokens and every row's RoPE positions, as the HF model would compute them unpruned."""
        raise NotImplementedError

    def vision_flops(self, clip: ClipShape) -> int:
        """FLOPs of the vision tower and projector on a clip (multiply-add = 1)."""
        raise NotImplementedError

    def smallest_clip(self, frames: int) -> ClipShape:
        """The clip of `frames` frames with the fewest visual tokens (frames of any size, where the
        count does not depend on it): what is checked before a clip's size is known."""
        return ClipShape(frames, 1, 1)

    # -- shared helpers --------------------------------------------------------------------------

    @classmethod
    def check_frames(cls, config: PretrainedConfig, frames: int, max_new_tokens: int) -> None:
        """The context check before the checkpoint is loaded: at least `fewest_video_rows` rows."""
        refuse_too_long(config.text_config.max_position_embeddings, frames, cls.fewest_video_rows(config, frames),
                        max_new_tokens)

    def check_context(self, clip: ClipShape, max_new_tokens: int, text_tokens: int | None = None) -> None:
        """The prompt (the clip's video rows + the text) plus the answer must fit the model's positions.
        `text_tokens` None: not counted yet, so the frames that fit are an upper bound and said to be one."""
        refuse_too_long(self.text_config.max_position_embeddings, clip.frames,
                        self.visual_tokens(clip) + self.prompt_overhead(clip), max_new_tokens, text_tokens)

    def words(self, token_ids: torch.Tensor) -> list[str]:
        """Each token of `token_ids` (1-D) as text on its own (what SparseVLM's raters are reported as)."""
        return [self.tokenizer.decode([i]).strip() for i in token_ids.tolist()]

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def special_tokens_in(self, text: str) -> list[str]:
        """The tokenizer's special and added tokens (<video>, <s>, ...) written out in `text`: the
        tokenizer would read them as those tokens, not as the user's words."""
        tokenizer = self.tokenizer
        tokens = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
        return sorted(t for t in tokens if t and t in text)

    def refuse_special_tokens(self, question: str) -> None:
        special = self.special_tokens_in(question)
        if special:
            raise UserError(f"the question contains {special[0]!r}, a special token of this model's tokenizer; "
                            "leave it out or spell it differently")
