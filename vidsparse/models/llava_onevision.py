"""LLaVA-OneVision / LLaVA-Video (`LlavaOnevisionForConditionalGeneration`, model_type `llava_onevision`;
`llava-hf/llava-onevision-qwen2-*-ov-hf` and `llava-hf/LLaVA-Video-7B-Qwen2-hf` are this class).

The video path of transformers 5.25 (`LlavaOnevisionModel.get_video_features`): each frame, resized
to image_size x image_size, goes through the SigLIP tower (no CLS); the states of
`vision_feature_layer` (strategy "full": every patch) go through the 2-layer projector, then
`apply_pooling` resizes each frame's g x g grid bilinearly to ceil(g/2) x ceil(g/2); the frames are
concatenated frame-major and ONE `image_newline` vector follows the whole video. The processor expands
`<video>` to frames * ceil(g/2)^2 + 1 placeholders, scattered in that order. The decoder is Qwen2
(1-D RoPE, positions 0..n-1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, PretrainedConfig

from vidsparse.models.family import ClipShape, VideoModel, positive_integers
from vidsparse.models.tower import feature_layer, run_reading
from vidsparse.models.tower_cut import PooledTowerCut, encoder_layer_flops, projector_flops
from vidsparse.models.visual import PromptEmbeds, VideoFeatures, VisualMap
from vidsparse.preprocess import normalize, resize_frames

# HF's chat template of the llava-hf OneVision checkpoints (chat_template.json; the processor tests'
# template) rendered for one user turn holding one video and one question, with the generation prompt.
PROMPT_TEMPLATE = "<|im_start|>user <video>\n{question}<|im_end|><|im_start|>assistant\n"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class LlavaOnevision(VideoModel):
    """A loaded LLaVA-OneVision / LLaVA-Video checkpoint.

    Layout: the `VisualMap` holds the frames' pooled patch tokens only, frame-major (frame = sampled
    frame index, row/col in the pooled ceil(g/2) x ceil(g/2) grid, no CLS). The `image_newline` row
    after the last frame is a separator: never pruned, not in the map, the last row of the prompt's
    head.

    Saliency (read by FastVID, VidCom2, DyCoke). SigLIP has no CLS; FastVID's official LLaVA-OV code
    reads the attention of SigLIP's attention-pooling head, but the OneVision conversion builds the
    tower with `vision_use_head=False` (and drops SigLIP's last layer, whose output fed the head), so
    an HF checkpoint carries no head to read. The adaptation:
    - `cls_attention` (T, ceil(g/2)^2): per patch, the attention it *receives* at the feature layer
      (the layer whose output the projector takes): softmax(q k^T / sqrt(d)) from that layer's
      input after layer_norm1, averaged over heads and over all g^2 queries of its frame (a frame
      at a time: one g^2 x g^2 map per head, never across frames). Each frame's g x g map is then
      resized with the same bilinear `apply_pooling` as the tokens, so a pooled token's saliency is
      the same mix of its source patches' saliencies as the token is of their features. Without a
      summary query, "how much every patch attends to it" is the closest stand-in for the CLS/probe
      query's attention; only the order within a frame matters to the methods.
    - `frame_embedding` (T, d_vision): the mean over the frame's patches of the feature layer's
      states after the tower's `post_layernorm` (the input SigLIP's head would have pooled).
    """

    model_type = "llava_onevision"
    config_class = LlavaOnevisionConfig
    model_class = LlavaOnevisionForConditionalGeneration

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def default_pixel_stats(cls) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std when a checkpoint has no preprocessor_config.json: SigLIP's 0.5 / 0.5, which the
        OneVision processors of every llava-hf checkpoint ship (transformers' class default is CLIP's,
        but the conversion takes the processor from google/siglip-so400m-patch14-384)."""
        return SIGLIP_MEAN, SIGLIP_STD

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> list[str]:
        vision, text = config.vision_config, config.text_config
        problems = positive_integers(("vision_config", vision), "image_size", "patch_size", "num_hidden_layers",
                                     "hidden_size") + super().check_config(config)
        if problems:
            return problems
        if getattr(vision, "model_type", None) != "siglip_vision_model":
            problems.append(f"vision_config.model_type is {getattr(vision, 'model_type', None)!r}: this family runs "
                            "a SigLIP tower (siglip_vision_model)")
        if config.vision_feature_select_strategy != "full":
            problems.append(f"vision_feature_select_strategy is {config.vision_feature_select_strategy!r}: SigLIP "
                            "has no CLS to drop, the video path needs 'full' (every patch)")
        layers = getattr(text, "layer_types", None) or []
        if "sliding_attention" in layers:
            problems.append("text_config uses sliding-window attention (use_sliding_window): the engine's decoder "
                            "attends to the whole prompt")
        return problems

    @classmethod
    def placeholder(cls, config: PretrainedConfig) -> tuple[str, int]:
        return "<video>", config.video_token_id

    # -- the family's own steps ------------------------------------------------------------------

    @staticmethod
    def _grid(config: PretrainedConfig) -> tuple[int, int]:
        """(patch grid side g, pooled grid side ceil(g/2)) of a frame, as `apply_pooling` computes them."""
        vision = config.vision_config
        grid = vision.image_size // vision.patch_size
        return grid, math.ceil(grid / 2)

    def visual_tokens(self, clip: ClipShape) -> int:
        return clip.frames * self._grid(self.model.config)[1] ** 2

    def prompt_overhead(self, clip: ClipShape) -> int:
        return 1  # the image_newline after the whole video

    @classmethod
    def fewest_video_rows(cls, config: PretrainedConfig, frames: int) -> int:
        return frames * cls._grid(config)[1] ** 2 + 1

    def seen_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Each frame resized to image_size x image_size (PIL's antialiased bicubic, no crop, no aspect
        kept: LlavaOnevisionVideoProcessor's size {height, width})."""
        size = self.model.config.vision_config.image_size
        return resize_frames(frames, (size, size))

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`seen_frames`, /255, normalised."""
        return normalize(self.seen_frames(frames), self.mean, self.std)

    def prompt_ids(self, question: str, clip: ClipShape) -> torch.Tensor:
        """The chat prompt with `<video>` repeated once per video row (pooled tokens + newline), written
        out in the text before tokenizing as LlavaOnevisionProcessor does."""
        self.refuse_special_tokens(question)
        config = self.model.config
        rows = self.visual_tokens(clip) + self.prompt_overhead(clip)
        text, video_id = self.placeholder(config)
        prefix, suffix = PROMPT_TEMPLATE.split("<video>")
        ids = self.tokenizer(prefix + text * rows + suffix.format(question=question)).input_ids
        found = sum(1 for i in ids if i == video_id)
        if found != rows:
            raise ValueError(f"tokenizer produced {found} video tokens, expected {rows}")
        return torch.tensor([ids], device=self.device)

    @torch.inference_mode()
    def video_features(self, pixels: torch.Tensor, saliency: bool = False) -> VideoFeatures:
        """(T, 3, S, S) pixels -> (T, ceil(g/2)^2, d) pooled projected tokens (HF's get_video_features
        without the newline, which `embed` adds); with `saliency`, the attention each patch receives at
        the feature layer and each frame's mean post-norm state (class docstring), read by hooks on
        that layer."""
        pixels = pixels.to(self.device, self.dtype)
        frames = pixels.shape[0]
        hf = self.model.model
        if not saliency:
            tokens = hf.get_video_features(pixel_values_videos=pixels[None]).pooler_output
            return VideoFeatures(tokens[0, :-1].reshape(frames, -1, tokens.shape[-1]))
        tower = hf.vision_tower
        layer = feature_layer(tower.encoder.layers, self.model.config.vision_feature_layer)
        tokens, layer_input, layer_output = run_reading(
            layer, lambda: hf.get_video_features(pixel_values_videos=pixels[None]).pooler_output)
        received = self.pool(attention_received(layer, layer_input).unsqueeze(-1)).squeeze(-1)
        embedding = tower.post_layernorm(layer_output).mean(1)
        return VideoFeatures(tokens[0, :-1].reshape(frames, -1, tokens.shape[-1]), received, embedding)

    @classmethod
    def tower_cut_depth(cls, config: PretrainedConfig) -> int:
        return feature_layer(range(config.vision_config.num_hidden_layers), config.vision_feature_layer) + 1

    def tower_cutter(self) -> PooledTowerCut:
        grid, pooled = self._grid(self.model.config)
        hf = self.model.model
        return PooledTowerCut(hf.vision_tower, hf.multi_modal_projector, self.tower_cut_depth(self.model.config),
                              grid, pooled, self.pool, hf.apply_pooling)

    def pool(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(T, g*g, c) per-patch values -> (T, ceil(g/2)^2, c): HF's `apply_pooling` (bilinear), in fp32."""
        grid, pooled = self._grid(self.model.config)
        frames, _, channels = per_patch.shape
        maps = per_patch.float().view(frames, grid, grid, channels).permute(0, 3, 1, 2)
        maps = F.interpolate(maps, size=[pooled, pooled], mode="bilinear")
        return maps.permute(0, 2, 3, 1).reshape(frames, pooled * pooled, channels)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, video: VideoFeatures, clip: ClipShape) -> PromptEmbeds:
        """Text embeddings with the frames' tokens, frame-major, then `image_newline` in the placeholders."""
        config = self.model.config
        features = video.tokens
        frames, per_frame = features.shape[:2]
        _, pooled = self._grid(config)
        if per_frame != pooled * pooled:
            raise ValueError(f"{per_frame} tokens a frame, this checkpoint's pooling gives {pooled * pooled}")
        embeds = self.decoder.embed_tokens(input_ids)
        _, video_id = self.placeholder(config)
        positions = (input_ids[0] == video_id).nonzero().squeeze(1)
        rows = frames * per_frame + 1
        if positions.numel() != rows:
            raise ValueError(f"{rows} video rows ({frames} frames x {per_frame} + newline) for "
                             f"{positions.numel()} placeholders")
        if int(positions[-1] - positions[0]) != rows - 1:
            raise ValueError("the video placeholders are not one consecutive block")
        newline = self.model.model.image_newline[None]
        flat = torch.cat([features.reshape(-1, features.shape[-1]), newline.to(features.dtype)])
        embeds[0, positions] = flat.to(embeds.dtype)
        head_length = int(positions[-1]) + 1
        words = self.words(input_ids[0, head_length:])
        index = torch.arange(frames * per_frame)
        in_frame = index % per_frame
        visual = VisualMap(positions=positions[:-1].cpu(), frame=index // per_frame, row=in_frame // pooled,
                           col=in_frame % pooled, is_cls=torch.zeros(index.numel(), dtype=torch.bool))
        rope = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1)
        saliency = None if video.cls_attention is None else video.cls_attention.flatten().float()
        frame_features = None if video.frame_embedding is None else video.frame_embedding.float()
        return PromptEmbeds(input_ids, embeds, visual, rope, head_length, head_length, head_length - 1, words, saliency,
                            frame_features)

    def vision_flops(self, clip: ClipShape) -> int:
        """SigLIP on g*g patches a frame (every layer: q/k/v/o, scores and mix, the 2-matrix MLP) and the
        projector on every patch (it runs before the pooling); multiply-add = 1, pooling negligible."""
        config = self.model.config
        vision, text = config.vision_config, config.text_config
        n = self._grid(config)[0] ** 2
        d = vision.hidden_size
        features_in = d * (1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer))
        return clip.frames * (vision.num_hidden_layers * encoder_layer_flops(n, d, vision.intermediate_size)
                              + projector_flops(n, features_in, text.hidden_size))


def attention_received(layer, layer_input: torch.Tensor) -> torch.Tensor:
    """(T, N) attention each of a frame's N tokens receives in a SigLIP encoder `layer`: softmax over
    keys (fp32) of every query, averaged over heads and queries, recomputed from the layer's input a
    frame at a time (one (H, N, N) map alive)."""
    attn = layer.self_attn
    frames, n, _ = layer_input.shape
    out = torch.empty(frames, n, dtype=torch.float32, device=layer_input.device)
    for t in range(frames):
        x = layer.layer_norm1(layer_input[t : t + 1])
        query = attn.q_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)  # (H, N, hd)
        keys = attn.k_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
        scores = (query @ keys.transpose(-1, -2)).float() * attn.scale
        out[t] = scores.softmax(-1).mean((0, 1))
    return out
