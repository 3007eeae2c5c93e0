"""Small LLaVA-OneVision models built from a config, for the tests of the family module.

The shape is the real checkpoints' (SigLIP tower without its pooling head, 2-layer GELU projector,
`image_newline`, Qwen2 decoder with q/k/v biases and GQA), only tiny. The tokenizer is lab/tiny.py's
word-level one with Qwen2's chat tokens added and, like Qwen2's tokenizer, no BOS: the chat template
is written out whole and the tokenizer adds nothing to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, processors
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from lab.tiny import word_tokenizer

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
WORDS = "what is happening in the video a red green blue circle square moves left right up down color".split()
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)  # what llava-hf's OneVision checkpoints ship (SigLIP's statistics)


def onevision_tokenizer(words: Iterable[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with <video>, <image>, <|im_start|>, <|im_end|> (eos) and no BOS."""
    tokenizer = word_tokenizer(words)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS], special_tokens=True)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def onevision_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 35,
    patch_size: int = 7,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 1024,
    vision_feature_layer: int = -1,
) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config of the 7B model's shape. The default 35 px / patch 7 gives an odd 5 x 5
    grid, pooled to 3 x 3 (ceil), so rounding in the pooling is exercised."""
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,  # as in the real checkpoints: the conversion drops SigLIP's pooling head
    )
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
    )


def save_tiny_onevision(path: Path, *, seed: int = 0, **config) -> Path:
    """A randomly initialised tiny LLaVA-OneVision + tokenizer + preprocessor_config.json (mean/std 0.5
    as the real checkpoints'), saved the way users' checkpoints are."""
    from transformers import LlavaOnevisionImageProcessorPil

    tokenizer = onevision_tokenizer()
    torch.manual_seed(seed)
    config = onevision_config(tokenizer, **config)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():  # decisive greedy choices (see tests/conftest.py save_tiny_checkpoint)
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    size = config.vision_config.image_size
    LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_mean=list(PIXEL_MEAN),
                                    image_std=list(PIXEL_STD)).save_pretrained(path)
    return path
