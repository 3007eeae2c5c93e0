"""VideoLLaVA adapter: load any checkpoint, build the prompt, embed a clip.

Everything model-specific the engine needs lives here: the decoder (a LlamaModel), the LM head,
and `embed`, which returns the prompt's input embeddings together with a map of which positions
are visual and which frame / row / column each one comes from (pruning keeps that map).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from vidsparse.errors import UserError
from vidsparse.models.loading import (
    find_checkpoint,
    load_config,
    load_pixel_stats,
    load_tokenizer,
    load_weights,
    resolve_device,
    resolve_dtype,
)
from vidsparse.models.visual import PromptEmbeds, VideoFeatures, VisualMap
from vidsparse.options import DEFAULT_MODEL
from vidsparse.preprocess import CLIP_MEAN, CLIP_STD

PROMPT_TEMPLATE = "USER: <video>\n{question} ASSISTANT:"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, n_visual: int, video_token_id: int) -> list[int]:
    """Token ids of the VideoLLaVA prompt, `<video>` expanded to `n_visual` placeholder tokens.

    The placeholder is repeated in the text before tokenizing, exactly as VideoLlavaProcessor does,
    so the ids around it are the ones the checkpoint was trained with.
    """
    special = _special_tokens_in(tokenizer, question)
    if special:
        raise UserError(f"the question contains {special[0]!r}, a special token of this model's tokenizer; "
                        "leave it out or spell it differently")
    prefix, suffix = PROMPT_TEMPLATE.split("<video>")
    text = prefix + "<video>" * n_visual + suffix.format(question=question)
    ids = tokenizer(text).input_ids
    found = sum(1 for i in ids if i == video_token_id)
    if found != n_visual:
        raise ValueError(f"tokenizer produced {found} video tokens, expected {n_visual}")
    return ids


def _special_tokens_in(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The tokenizer's special and added tokens (<video>, <s>, ...) written out in `text`: the
    tokenizer would read them as those tokens, not as the user's words."""
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    return sorted(t for t in tokens if t and t in text)


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


def check_context(config: VideoLlavaConfig, num_frames: int, max_new_tokens: int, text_tokens: int | None = None
                  ) -> None:
    """The prompt (frames x tokens a frame + the text) plus the answer must fit the model's positions.
    `text_tokens` None: not counted yet (checked before the tokenizer is loaded), so the frames that
    fit are an upper bound and said to be one."""
    limit = config.text_config.max_position_embeddings
    counted = text_tokens or 0
    needed = num_frames * tokens_per_frame(config) + counted + max_new_tokens
    if needed <= limit:
        return
    frames_that_fit = (limit - counted - max_new_tokens) // tokens_per_frame(config)
    if frames_that_fit >= 1 and text_tokens is None:
        remedy = (f"sample fewer --frames ({frames_that_fit} would leave no room for the prompt's text), or lower "
                  "--max-new-tokens")
    elif frames_that_fit >= 1:
        remedy = f"sample at most {frames_that_fit} --frames, or lower --max-new-tokens"
    else:
        remedy = "shorten the question" if counted >= limit // 2 else "lower --max-new-tokens"
    text = "the prompt's text" if text_tokens is None else f"{text_tokens} text tokens"
    raise UserError(f"the prompt plus answer needs {'more than ' * (text_tokens is None)}{needed} positions "
                    f"({num_frames} frames x {tokens_per_frame(config)} visual tokens, {text}, {max_new_tokens} new "
                    f"tokens) but the model has {limit}: {remedy}")


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


class VideoLlava:
    """A loaded VideoLLaVA checkpoint (video tower, projector, Llama decoder, LM head) + tokenizer."""

    def __init__(self, model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, name: str,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.mean, self.std = mean, std
        config = model.config
        self.image_size: int = config.vision_config.image_size
        self.grid: int = self.image_size // config.vision_config.patch_size
        self.tokens_per_frame: int = tokens_per_frame(config)
        self.video_token_id: int = config.video_token_id
        eos = config.text_config.eos_token_id
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id} - {None}

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto"
    ) -> VideoLlava:
        """Load from a hub id or a local folder, by the same `from_pretrained` path for every checkpoint."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = find_checkpoint(name_or_path)
        config = load_config(source)
        tokenizer = load_tokenizer(source, config)
        mean, std = load_pixel_stats(source)
        model = load_weights(source, config, torch_dtype)
        # Video-only use: the image tower is never run (0.3B parameters on the 7B model).
        model.model.image_tower = None
        model.to(torch_device).eval()
        return cls(model, tokenizer, name_or_path, mean, std)

    @property
    def decoder(self):
        """The Llama decoder (embed_tokens, layers, norm, rotary_emb)."""
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

    def check_context(self, text_tokens: int | None, num_frames: int, max_new_tokens: int) -> None:
        check_context(self.model.config, num_frames, max_new_tokens, text_tokens)

    def prompt_ids(self, question: str, num_frames: int) -> torch.Tensor:
        ids = prompt_ids(self.tokenizer, question, num_frames * self.tokens_per_frame, self.video_token_id)
        return torch.tensor([ids], device=self.device)

    @torch.inference_mode()
    def video_features(self, pixels: torch.Tensor, saliency: bool = False) -> VideoFeatures:
        """(T, 3, S, S) pixels -> projected visual tokens; with `saliency`, also the CLS attention and
        frame embedding of the feature layer (read by hooks on that layer: one query row, no n x n)."""
        pixels = pixels.to(self.device, self.dtype)
        if not saliency:
            return VideoFeatures(self.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output)
        tower = self.model.model.video_tower
        feature_layer = self.model.config.vision_feature_layer
        if isinstance(feature_layer, int):
            feature_layer %= len(tower.encoder.layers) + 1
        if not isinstance(feature_layer, int) or feature_layer < 1:
            raise UserError(f"this checkpoint feeds the projector from vision_feature_layer {feature_layer}: there "
                            "is no single tower layer to read the CLS attention from")
        layer = tower.encoder.layers[feature_layer - 1]  # hidden_states[k] is the output of layer k - 1
        seen = {}

        def keep_input(module, args, kwargs) -> None:
            seen["input"] = args[0] if args else kwargs["hidden_states"]

        def keep_output(module, args, output) -> None:
            seen["output"] = output[0] if isinstance(output, tuple) else output

        hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True),
                 layer.register_forward_hook(keep_output)]
        try:
            tokens = self.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output
        finally:
            for hook in hooks:
                hook.remove()
        return VideoFeatures(tokens, cls_attention(layer, seen["input"]), tower.post_layernorm(seen["output"][:, 0]))

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, video: VideoFeatures) -> PromptEmbeds:
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
        suffix = input_ids[0, int(positions[-1]) + 1 :].tolist()
        words = [self.tokenizer.decode([i]).strip() for i in suffix]
        saliency = None if video.cls_attention is None else video.cls_attention.flatten().float()
        return PromptEmbeds(input_ids, embeds, visual_map(positions.cpu(), num_frames, self.grid), words, saliency,
                            None if video.frame_embedding is None else video.frame_embedding.float())

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
