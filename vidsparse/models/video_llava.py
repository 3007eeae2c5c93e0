"""The VideoLLaVA family: CLIP ViT video tower (a CLS token per frame kept for video), two-layer
projector, Llama decoder with 1-D RoPE, prompt `USER: <video>\n{question} ASSISTANT:`.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PretrainedConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from vidsparse.models.family import ClipShape, VideoModel, positive_integers
from vidsparse.models.tower import feature_layer, run_reading
from vidsparse.models.tower_cut import ClipTowerCut, encoder_layer_flops, projector_flops
from vidsparse.models.visual import PromptEmbeds, VideoFeatures, VisualMap
from vidsparse.preprocess import CLIP_MEAN, CLIP_STD, preprocess_frames, resize_and_crop

PROMPT_TEMPLATE = "USER: <video>\n{question} ASSISTANT:"


def prompt_text(question: str, n_visual: int) -> str:
    """The VideoLLaVA prompt, `<video>` repeated `n_visual` times in the text before tokenizing,
    exactly as VideoLlavaProcessor does, so the ids around it are the ones the checkpoint was trained with."""
    prefix, suffix = PROMPT_TEMPLATE.split("<video>")
    return prefix + "<video>" * n_visual + suffix.format(question=question)


def cls_attention(layer, layer_input: torch.Tensor) -> torch.Tensor:
    """(T, N) head-averaged attention probabilities of each frame's CLS query (row 0) over its N
    tokens in a CLIP encoder `layer`, recomputed from the layer's input (softmax in fp32)."""
    attn = layer.self_attn
    x = layer.layer_norm1(layer_input)
    frames, n, _ = x.shape
    query = attn.q_proj(x[:, :1]).view(frames, 1, -1, attn.head_dim).transpose(1, 2)  # (T, H, 1, hd)
    keys = attn.k_proj(x).view(frames, n, -1, attn.head_dim).transpose(1, 2)  # (T, H, N, hd)
    scores = (query @ keys.transpose(-1, -2)).float() * attn.scale
    return scores.softmax(-1).mean(1)[:, 0]


def tokens_per_frame(config: VideoLlavaConfig) -> int:
    """Visual tokens a frame becomes: the patch grid plus CLS (VideoLLaVA keeps CLS for video)."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


def visual_map(positions: torch.Tensor, num_frames: int, grid: int) -> VisualMap:
    """Frame-major layout of the video tower's output: per frame, CLS then grid x grid patches."""
    per_frame = grid * grid + 1
    index = torch.arange(num_frames * per_frame)
    in_frame = index % per_frame
    patch = in_frame - 1
    is_cls = in_frame == 0
    return VisualMap(
        positions=positions,
        frame=index // per_frame,
        row=torch.where(is_cls, -1, patch // grid),
        col=torch.where(is_cls, -1, patch % grid),
        is_cls=is_cls,
    )


class VideoLlava(VideoModel):
    """A loaded VideoLLaVA checkpoint (video tower, projector, Llama decoder, LM head) + tokenizer."""

    model_type = "video_llava"
    config_class = VideoLlavaConfig
    model_class = VideoLlavaForConditionalGeneration

    def __init__(self, model: VideoLlavaForConditionalGeneration, tokenizer, name: str,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                 video_processor: dict | None = None):
        super().__init__(model, tokenizer, name, mean, std, video_processor)
        config = model.config
        self.image_size: int = config.vision_config.image_size
        self.grid: int = self.image_size // config.vision_config.patch_size
        self.video_token_id: int = config.video_token_id

    @classmethod
    def default_pixel_stats(cls) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return CLIP_MEAN, CLIP_STD

    @classmethod
    def check_config(cls, config: VideoLlavaConfig) -> list[str]:
        vision = config.vision_config
        problems = positive_integers(("vision_config", vision), "image_size", "patch_size", "num_hidden_layers"
                                     ) + super().check_config(config)
        if not problems and vision.patch_size > vision.image_size:
            problems.append(f"vision_config.patch_size {vision.patch_size} exceeds image_size {vision.image_size}")
        read = config.vision_feature_layer
        layers = vision.num_hidden_layers if isinstance(vision.num_hidden_layers, int) else 0
        if not all(isinstance(k, int) and -(layers + 1) <= k <= layers for k in (read if isinstance(read, list)
                                                                               else [read])):
            problems.append(f"vision_feature_layer {read!r} names no hidden state of a {layers}-layer tower")
        return problems

    @classmethod
    def placeholder(cls, config: VideoLlavaConfig) -> tuple[str, int]:
        return "<video>", config.video_token_id

    @classmethod
    def unused_weights(cls) -> tuple[str, ...]:
        return (".image_tower.",)

    def drop_unused(self) -> None:
        # Video-only use: the image tower is never run (0.3B parameters on the 7B model).
        self.model.model.image_tower = None
        # Nor the video tower's layers after the one its projector reads (Video-LLaVA-7B's last of 24):
        # HF runs them and reads nothing from them. The projector then reads the new last layer.
        config, tower = self.model.config, self.model.model.video_tower
        layers = tower.encoder.layers
        if isinstance(config.vision_feature_layer, int):
            depth = config.vision_feature_layer % (len(layers) + 1)  # hidden_states[k] is layer k - 1's output
            if depth >= 1:  # (0: the embeddings themselves)
                del layers[depth:]
                # HF resolves hidden_states[-1] from the tower's own config: the same object today, set both.
                config.vision_config.num_hidden_layers = tower.config.num_hidden_layers = depth
                config.vision_feature_layer = -1

    def visual_tokens(self, clip: ClipShape) -> int:
        return clip.frames * tokens_per_frame(self.model.config)

    @classmethod
    def fewest_video_rows(cls, config: PretrainedConfig, frames: int) -> int:
        return frames * tokens_per_frame(config)

    def seen_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return resize_and_crop(frames, self.image_size)

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return preprocess_frames(frames, self.image_size, self.mean, self.std)

    def prompt_ids(self, question: str, clip: ClipShape) -> torch.Tensor:
        self.refuse_special_tokens(question)
        n_visual = self.visual_tokens(clip)
        ids = self.tokenizer(prompt_text(question, n_visual)).input_ids
        found = sum(1 for i in ids if i == self.video_token_id)
        if found != n_visual:
            raise ValueError(f"tokenizer produced {found} video tokens, expected {n_visual}")
        return torch.tensor([ids], device=self.device)

    def vision_flops(self, clip: ClipShape) -> int:
        """Vision tower (every layer runs) + projector, multiply-add = 1; CLIP's MLP has two matrices."""
        config = self.model.config
        vision = config.vision_config
        n = tokens_per_frame(config)
        per_layer = encoder_layer_flops(n, vision.hidden_size, vision.intermediate_size)
        return clip.frames * (vision.num_hidden_layers * per_layer
                              + projector_flops(n, vision.hidden_size, config.text_config.hidden_size))

    @classmethod
    def tower_cut_depth(cls, config: VideoLlavaConfig) -> int:
        layers = range(config.vision_config.num_hidden_layers)
        return feature_layer(layers, config.vision_feature_layer) + 1

    def tower_cutter(self) -> ClipTowerCut:
        return ClipTowerCut(self.model.model.video_tower, self.model.model.multi_modal_projector,
                            self.tower_cut_depth(self.model.config), self.grid)

    @torch.inference_mode()
    def video_features(self, pixels: torch.Tensor, saliency: bool = False) -> VideoFeatures:
        """(T, 3, S, S) pixels -> projected visual tokens; with `saliency`, also the CLS attention and
        frame embedding of the feature layer (read by hooks on that layer: one query row, no n x n)."""
        pixels = pixels.to(self.device, self.dtype)
        if not saliency:
            return VideoFeatures(self.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output)
        tower = self.model.model.video_tower
        layer = feature_layer(tower.encoder.layers, self.model.config.vision_feature_layer)
        tokens, layer_input, layer_output = run_reading(
            layer, lambda: self.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output)
        return VideoFeatures(tokens, cls_attention(layer, layer_input), tower.post_layernorm(layer_output[:, 0]))

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, video: VideoFeatures, clip: ClipShape) -> PromptEmbeds:
        """Text embeddings with the visual features scattered, frame-major, into the placeholders."""
        features = video.tokens
        embeds = self.decoder.embed_tokens(input_ids)
        is_video = input_ids[0] == self.video_token_id
        positions = is_video.nonzero().squeeze(1)
        flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        if flat.shape[0] != positions.numel():
            raise ValueError(f"{flat.shape[0]} visual features for {positions.numel()} placeholders")
        embeds[0, positions] = flat
        num_frames = features.shape[0]
        head_length = int(positions[-1]) + 1
        words = self.words(input_ids[0, head_length:])
        saliency = None if video.cls_attention is None else video.cls_attention.flatten().float()
        rope = torch.arange(input_ids.shape[1], device=input_ids.device)[None, None]
        return PromptEmbeds(input_ids, embeds, visual_map(positions.cpu(), num_frames, self.grid), rope, head_length,
                            head_length, head_length - 1, words, saliency,
                            None if video.frame_embedding is None else video.frame_embedding.float())
