"""Qwen2.5-VL family: dynamic-resolution frames, temporal patches of two frames, M-RoPE positions.

Facts read from transformers 5.25 (`models/qwen2_5_vl/modeling_qwen2_5_vl.py`, the Qwen2-VL image and
video processors) that this module reproduces:

- `Qwen2_5_VLForConditionalGeneration`: vision tower `model.model.visual`, text decoder
  `model.model.language_model` (a `Qwen2_5_VLTextModel`: embed_tokens, layers, norm, rotary_emb),
  LM head `model.lm_head` -- the base class's paths.
- Frames are resized by `smart_resize` to multiples of patch_size * merge_size (28) with their pixel
  count within [min_pixels, max_pixels], PIL bicubic, OPENAI CLIP mean/std; an odd frame count is
  padded by repeating the last frame (the video processor's `patchify`); two frames make one
  temporal patch, 2x2 patches one visual token ("span" below: the two frames a token covers).
- The flattened patches are in merge-window order: (t, h/2, w/2, 2, 2) rows of
  (C, temporal_patch, patch, patch) values; the merger's output comes back in raster order per span.
- `get_rope_index`: text rows count up from 0 in all three dimensions; the visual tokens starting at
  position s get (s + int(t * tokens_per_second * second_per_grid), s + row, s + col), with
  second_per_grid = temporal_patch_size / sampled fps (1 second when not given); the text after the
  video continues at s + max(rows, cols) in all three dimensions. Note: that is *not* "the video's
  largest position + 1" once the temporal positions outrun the spatial ones (long clips, low fps):
  5.25 computes it so, and this module does the same. Decoding continues at the prompt's largest
  position + 1 (HF's `rope_deltas`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from vidsparse.errors import UserError
from vidsparse.models.family import VIDEO_PROCESSOR_FILE, ClipShape, VideoModel, positive_integers
from vidsparse.models.visual import PromptEmbeds, VideoFeatures, VisualMap
from vidsparse.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_frames

# Qwen2VLVideoProcessor's per-frame bounds (= qwen-vl-utils' VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_PAD = "<|video_pad|>"
# Qwen2.5-VL's chat template (chat_template.json) for one user turn [video, text] with the generation
# prompt; it adds the default system message when none is given.
PROMPT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   "<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")  # generation_config.json's eos_token_id of the Instruct models


def pixel_bounds(processor: dict | None) -> tuple[int, int]:
    """(min_pixels, max_pixels) a frame from a checkpoint's video processor config
    (video_preprocessor_config.json): `size` {shortest_edge, longest_edge} as transformers 5 saves it, or
    the older min_pixels / max_pixels keys; the video processor's defaults for what it lacks."""
    processor = processor or {}
    size = processor.get("size") if isinstance(processor.get("size"), dict) else {}
    low = processor.get("min_pixels", size.get("shortest_edge", VIDEO_MIN_PIXELS))
    high = processor.get("max_pixels", size.get("longest_edge", VIDEO_MAX_PIXELS))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (low, high)) or low > high:
        raise UserError(f"{VIDEO_PROCESSOR_FILE}'s pixel bounds must be positive integers, min <= max: got "
                        f"min_pixels {low!r}, max_pixels {high!r}")
    return low, high


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's frame size: both sides multiples of `factor`, close to the aspect ratio, the pixel
    count within [min_pixels, max_pixels] (the processors' `smart_resize`, step for step)."""
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"a {width}x{height} video is too elongated for Qwen2.5-VL (aspect ratio above 200)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen25VL(VideoModel):
    """A loaded Qwen2.5-VL checkpoint.

    Pixel bounds: a frame is brought to `smart_resize(h, w, 28, min_pixels, max_pixels)` with the
    checkpoint's video processor bounds (video_preprocessor_config.json), else the video processor's
    defaults VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS (128 and 768 tokens' worth of 28x28 pixels a frame,
    qwen-vl-utils' video bounds too). Deliberately, `preprocessor_config.json`'s min/max_pixels (the
    image processor's: 3136 and 12845056 in Qwen/Qwen2.5-VL-7B-Instruct) are not video bounds here,
    although HF 5.25's video processor falls back to that file when a checkpoint has no video processor
    config (then HF would give a 720p frame 1196 tokens a span where the video defaults give 720).

    Time: a token's temporal position is int(span * tokens_per_second * 2 / fps), fps being the
    sampled frames per second of video (`ClipShape.fps`); fps None is HF's default of one second a
    span (fps 2, qwen-vl-utils' default sampling rate).

    Saliency (no CLS here, and most ViT blocks attend within windows of 8x8 patches): the per-token
    importance (`VideoFeatures.cls_attention`, (spans, tokens)) is the attention each patch receives
    at the *last full-attention block* (the 7B's last block, whose output feeds the merger), averaged
    over heads and over the span's queries, then summed over the 2x2 patches a token merges: each
    span's row sums to 1, like CLIP's CLS attention. It is recomputed from the block's input one span
    and one head at a time (a (patches, patches) matrix at most). The frame embedding
    (spans, d_vision) is the mean over the span's patches of the merger's input after its RMSNorm
    (`merger.ln_q`), the tower's final norm.
    """

    model_type = "qwen2_5_vl"
    config_class = Qwen2_5_VLConfig
    model_class = Qwen2_5_VLForConditionalGeneration
    position_dims = 3

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 video_processor: dict | None = None):
        super().__init__(model, tokenizer, name, mean, std, video_processor)
        self.min_pixels, self.max_pixels = pixel_bounds(video_processor)
        vocab = tokenizer.get_vocab()
        self.eos_token_ids |= {vocab[t] for t in END_TOKENS if t in vocab}

    # -- config ----------------------------------------------------------------------------------

    @classmethod
    def default_pixel_stats(cls) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return CLIP_MEAN, CLIP_STD

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> list[str]:
        vision, text = config.vision_config, config.text_config
        problems = positive_integers(("vision_config", vision), "patch_size", "spatial_merge_size",
                                     "temporal_patch_size", "window_size", "tokens_per_second", "depth", "hidden_size",
                                     "num_heads") + super().check_config(config)
        if problems:
            return problems
        if vision.temporal_patch_size != 2:
            problems.append(f"vision_config.temporal_patch_size is {vision.temporal_patch_size!r}: Qwen2.5-VL's "
                            "tokens cover 2 frames")
        if not problems and vision.window_size // vision.spatial_merge_size // vision.patch_size < 1:
            problems.append(f"vision_config.window_size {vision.window_size} is smaller than a merged token "
                            f"({vision.spatial_merge_size * vision.patch_size} pixels)")
        sliding = [i for i, kind in enumerate(text.layer_types or []) if kind != "full_attention"]
        if sliding:
            problems.append(f"text_config has sliding-window attention in layers {sliding[0]}.. (use_sliding_window): "
                            "vidsparse's decoder attends over the whole prompt")
        section = (text.rope_parameters or {}).get("mrope_section")
        head_dim = text.hidden_size // text.num_attention_heads
        if not isinstance(section, list | tuple) or len(section) != 3 or sum(section) != head_dim // 2:
            problems.append(f"text_config.rope_parameters.mrope_section is {section!r}, must be three numbers summing "
                            f"to head_dim / 2 = {head_dim // 2}")
        return problems

    @classmethod
    def placeholder(cls, config: PretrainedConfig) -> tuple[str, int]:
        return VIDEO_PAD, config.video_token_id

    # -- layout ----------------------------------------------------------------------------------

    def _grid(self, clip: ClipShape) -> tuple[int, int, int]:
        """(grid_t, grid_h, grid_w) in patches, HF's video_grid_thw."""
        vision = self.model.config.vision_config
        height, width = self.frame_size(clip.height, clip.width)
        return -(-clip.frames // vision.temporal_patch_size), height // vision.patch_size, width // vision.patch_size

    def visual_tokens(self, clip: ClipShape) -> int:
        t, h, w = self._grid(clip)
        return t * h * w // self.model.config.vision_config.spatial_merge_size ** 2

    def spans(self, clip: ClipShape) -> int:
        return -(-clip.frames // 2)  # temporal patch 2 (check_config holds every checkpoint to it)

    @classmethod
    def fewest_video_rows(cls, config: PretrainedConfig, frames: int) -> int:
        return -(-frames // 2)  # a token a span at least: the checkpoint's pixel bounds are not read yet

    def smallest_clip(self, frames: int) -> ClipShape:
        """Frames of min_pixels in the fewest tokens: one merged token high, as wide as min_pixels needs."""
        factor = self.model.config.vision_config.patch_size * self.model.config.vision_config.spatial_merge_size
        return ClipShape(frames, factor, factor * max(1, -(-self.min_pixels // factor ** 2)))

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        vision = self.model.config.vision_config
        return smart_resize(height, width, vision.patch_size * vision.spatial_merge_size, self.min_pixels,
                            self.max_pixels)

    def seen_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(frames)
        return resize_frames(x, self.frame_size(*x.shape[1:3]))

    # -- pixels and tokens -----------------------------------------------------------------------

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float32 (grid_t, grid_h / m, grid_w / m, m * m, C * 2 * p * p), m the
        merge size, p the patch: HF's pixel_values_videos row for row once flattened to (-1, patch_dim)
        (merge-window order), with the grid readable from the shape."""
        vision = self.model.config.vision_config
        p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        pixels = normalize(self.seen_frames(frames), self.mean, self.std)
        height, width = pixels.shape[-2:]
        if pad := -pixels.shape[0] % tp:  # the video processor repeats the last frame
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        t, c = pixels.shape[0] // tp, pixels.shape[1]
        gh, gw = height // p, width // p
        patches = pixels.view(t, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(t, gh // m, gw // m, m * m, c * tp * p * p)

    def _grid_of(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model.config.vision_config.spatial_merge_size
        t, rows, cols = pixels.shape[:3]
        return torch.tensor([[t, rows * m, cols * m]], device=self.device)

    @torch.inference_mode()
    def video_features(self, pixels: torch.Tensor, saliency: bool = False) -> VideoFeatures:
        """`preprocess`'s pixels -> (spans, rows * cols, d) merged tokens in raster order; with `saliency`,
        the attention each token receives at the last full-attention block and each span's mean
        normalised state (see the class docstring)."""
        grid = self._grid_of(pixels)
        spans, rows, cols = pixels.shape[:3]
        flat = pixels.reshape(-1, pixels.shape[-1]).to(self.device, self.dtype)
        visual = self.model.model.visual
        if not saliency:
            tokens = self.model.model.get_video_features(flat, grid).pooler_output[0]
            return VideoFeatures(tokens.view(spans, rows * cols, -1))
        full = [i for i in range(len(visual.blocks)) if i in visual.fullatt_block_indexes]
        if not full:
            raise UserError("this checkpoint's vision tower has no full-attention block to read saliency from")
        block = visual.blocks[full[-1]]
        seen = {}

        def keep_block_input(module, args, kwargs) -> None:
            seen["block"] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        def keep_merger_input(module, args) -> None:
            seen["merger"] = args[0]

        hooks = [block.register_forward_pre_hook(keep_block_input, with_kwargs=True),
                 visual.merger.register_forward_pre_hook(keep_merger_input)]
        try:
            tokens = self.model.model.get_video_features(flat, grid).pooler_output[0]
        finally:
            for hook in hooks:
                hook.remove()
        hidden, rotary = seen["block"]
        received = received_attention(block, hidden, rotary, rows * cols * visual.spatial_merge_unit)
        # The tower runs window-permuted (merge units reordered window by window within each span);
        # HF's merger output is put back in raster order by argsort(window_index): do the same.
        window_index, _ = get_vision_window_index(grid.cpu(), visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        per_unit = received.view(-1, visual.spatial_merge_unit).sum(1)[torch.argsort(window_index).to(received.device)]
        normed = visual.merger.ln_q(seen["merger"]).float()
        return VideoFeatures(tokens.view(spans, rows * cols, -1), per_unit.view(spans, -1),
                             normed.view(spans, -1, normed.shape[-1]).mean(1))

    # -- the prompt ------------------------------------------------------------------------------

    def prompt_ids(self, question: str, clip: ClipShape) -> torch.Tensor:
        self.refuse_special_tokens(question)
        n_visual = self.visual_tokens(clip)
        prefix, suffix = PROMPT_TEMPLATE.split(VIDEO_PAD)
        text = prefix + VIDEO_PAD * n_visual + suffix.format(question=question)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids  # the template has its own specials
        video_id = self.model.config.video_token_id
        found = sum(1 for i in ids if i == video_id)
        if found != n_visual:
            raise ValueError(f"tokenizer produced {found} video tokens, expected {n_visual}")
        return torch.tensor([ids], device=self.device)

    def hf_video_inputs(self, pixels: torch.Tensor, input_ids: torch.Tensor, clip: ClipShape) -> dict:
        """Flat patches, each clip's grid in patches, the token types (video = 2: without them HF falls
        back to 1-D positions) and the seconds a temporal patch covers."""
        batch, spans, rows, cols = pixels.shape[:4]
        vision = self.model.config.vision_config
        merge = vision.spatial_merge_size
        inputs = {"pixel_values_videos": pixels.reshape(-1, pixels.shape[-1]),
                  "video_grid_thw": torch.tensor([[spans, rows * merge, cols * merge]] * batch),
                  "mm_token_type_ids": (input_ids == self.model.config.video_token_id).int() * 2}
        if clip.fps:
            inputs["second_per_grid_ts"] = torch.tensor([vision.temporal_patch_size / clip.fps] * batch)
        return inputs

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, video: VideoFeatures, clip: ClipShape) -> PromptEmbeds:
        """Text embeddings with the tokens scattered into the <|video_pad|> rows (HF's masked_scatter),
        the map of those rows, and HF get_rope_index's positions for the whole prompt (time from the
        clip's sampled fps; None: one second a span, HF's default)."""
        merge = self.model.config.vision_config.spatial_merge_size
        _, grid_h, grid_w = self._grid(clip)
        rows, cols = grid = (grid_h // merge, grid_w // merge)
        spans = video.tokens.shape[0]
        embeds = self.decoder.embed_tokens(input_ids)
        positions = (input_ids[0] == self.model.config.video_token_id).nonzero().squeeze(1)
        flat = video.tokens.reshape(-1, video.tokens.shape[-1]).to(embeds.dtype)
        if flat.shape[0] != positions.numel() or flat.shape[0] != spans * rows * cols:
            raise ValueError(f"{flat.shape[0]} visual features ({spans} spans of {rows}x{cols}) for "
                             f"{positions.numel()} placeholders")
        if positions.numel() and int(positions[-1] - positions[0]) + 1 != positions.numel():
            raise ValueError("the prompt's video placeholders are not one consecutive block")
        embeds[0, positions] = flat
        index = torch.arange(spans * rows * cols)
        in_span = index % (rows * cols)
        visual = VisualMap(positions=positions.cpu(), frame=index // (rows * cols), row=in_span // cols,
                           col=in_span % cols, is_cls=torch.zeros_like(index, dtype=torch.bool),
                           frames_per_span=self.model.config.vision_config.temporal_patch_size)
        head_length = int(positions[-1]) + 1
        words = self.words(input_ids[0, head_length:])
        saliency = None if video.cls_attention is None else video.cls_attention.flatten().float()
        rope = self.rope_positions(input_ids, spans, grid, clip.fps)
        text_start = int(rope[0, 0, head_length]) if head_length < rope.shape[-1] else int(rope.max()) + 1
        return PromptEmbeds(input_ids, embeds, visual, rope, head_length, text_start,
                            int(rope[..., :head_length].max()), words, saliency,
                            None if video.frame_embedding is None else video.frame_embedding.float())

    def rope_positions(self, input_ids: torch.Tensor, spans: int, grid: tuple[int, int],
                       fps: float | None = None) -> torch.Tensor:
        """(3, 1, n) long: HF get_rope_index's positions of a prompt holding one video of `spans`
        temporal patches of rows x cols tokens, sampled at `fps`."""
        vision = self.model.config.vision_config
        ids = input_ids[0].cpu()
        is_video = (ids == self.model.config.video_token_id).tolist()  # a list: walked row by row below
        n = len(is_video)
        out = torch.empty(3, n, dtype=torch.long)
        # Second per temporal patch as HF receives it: a float32 tensor from the processor (1 if not given).
        second = 1 if fps is None else torch.tensor(vision.temporal_patch_size / fps, dtype=torch.float32)
        interval = vision.tokens_per_second * second
        current, start, videos = 0, 0, 0
        while start < n:
            end = start + 1
            while end < n and is_video[end] == is_video[start]:
                end += 1
            if not is_video[start]:
                out[:, start:end] = torch.arange(end - start) + current
                current += end - start
            else:
                rows, cols = grid
                videos += 1
                if videos > 1 or end - start != spans * rows * cols:
                    raise ValueError(f"the prompt must hold one video of {spans * rows * cols} placeholders")
                t = (torch.arange(spans) * interval).long()
                tt, hh, ww = torch.meshgrid(t, torch.arange(rows), torch.arange(cols), indexing="ij")
                out[:, start:end] = torch.stack([tt, hh, ww]).reshape(3, -1) + current
                current += max(rows, cols)
            start = end
        return out[:, None].to(input_ids.device)

    # -- cost ------------------------------------------------------------------------------------

    def vision_flops(self, clip: ClipShape) -> int:
        """Patch embedding, every ViT block (q/k/v/o, attention within each window or each span's full
        frame, the gated MLP) and the merger MLP; multiply-add = 1, norms and softmax not counted."""
        vision = self.model.config.vision_config
        t, h, w = self._grid(clip)
        m, p = vision.spatial_merge_size, vision.patch_size
        d, inner, c = vision.hidden_size, vision.intermediate_size, vision.in_channels
        n = t * h * w
        embed = n * c * vision.temporal_patch_size * p * p * d
        linear = 4 * n * d * d + 3 * n * d * inner
        full_attention = 2 * t * (h * w) ** 2 * d
        side = vision.window_size // m // p  # a window's side in merged tokens

        def squares(length: int) -> int:  # sum of squared window extents (patches) along one axis
            return sum((min(side, length - k) * m) ** 2 for k in range(0, length, side))

        window_attention = 2 * t * squares(h // m) * squares(w // m) * d
        blocks = sum(linear + (full_attention if i in vision.fullatt_block_indexes else window_attention)
                     for i in range(vision.depth))
        merged = d * m * m
        merger = (n // (m * m)) * (merged * merged + merged * vision.out_hidden_size)
        return embed + blocks + merger


def received_attention(block, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                       span_length: int) -> torch.Tensor:
    """(N,) float32: the attention each row of `hidden` receives in a full-attention vision `block`,
    averaged over heads and over the queries of its span (consecutive runs of `span_length` rows),
    recomputed from the block's input; softmax in fp32, one (span, span) matrix at a time."""
    attn = block.attn
    cos, sin = rotary
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], span_length):
        span = slice(start, start + span_length)
        x = block.norm1(hidden[span])
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos[span], sin[span])
        for head in range(attn.num_heads):
            scores = (q[:, head].float() @ k[:, head].float().T) * attn.scaling
            out[span] += scores.softmax(-1).mean(0)
    return out / attn.num_heads
