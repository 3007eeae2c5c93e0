"""Small Qwen2.5-VL models built from a config, for the family's tests.

The model is `Qwen2_5_VLForConditionalGeneration` with every part of the 7B model's shape (patch-14
ViT with 2x2 merger, temporal patch 2, window attention with full-attention blocks, GQA decoder with
M-RoPE), only a few hundred thousand parameters. The tokenizer is lab.tiny's word-level one plus
Qwen's special tokens, so a checkpoint saved with `save_pretrained` loads the way users' do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

from lab.tiny import word_tokenizer
from lab.tiny_onevision import WORDS

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
TEMPLATE_WORDS = ["system", "you", "are", "a", "helpful", "assistant", "user", "."]


def qwen_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """lab.tiny's word tokenizer over `words` and the chat template's words, with Qwen's special tokens
    added (as special: the tokenizer splits them out before the word model sees the text)."""
    tokenizer = word_tokenizer([*TEMPLATE_WORDS, *words])
    tokenizer.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


def qwen2_5_vl_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    patch_size: int = 14,
    window_size: int = 56,
    fullatt_block_indexes: tuple[int, ...] = (1,),
    tokens_per_second: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    kv_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    rope_theta: float = 10000.0,
    max_positions: int = 4096,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the 7B model's shape, only smaller. `window_size` 56 with patch 14 and
    merge 2 makes windows of 2x2 merged tokens (the 7B: 112 -> 4x4), so a tiny frame has several;
    block 1 of 2 attends fully (the 7B: blocks 7, 15, 23, 31 of 32, the last one full too).
    `mrope_section` must sum to head_dim / 2 (64 / 4 heads = 16 -> 8)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vision = Qwen2_5_VLVisionConfig(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_heads,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=tokens_per_second,
        window_size=window_size,
        out_hidden_size=text_hidden,
        fullatt_block_indexes=list(fullatt_block_indexes),
    )
    text = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)},
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)


def save_tiny_qwen(path: Path, *, words: Iterable[str] = WORDS, seed: int = 0, **config) -> Path:
    """A randomly initialised tiny Qwen2.5-VL + word tokenizer, saved the way users' checkpoints are;
    the LM head is scaled up so that greedy choices are decisive (tests/conftest.py does the same)."""
    tokenizer = qwen_tokenizer(words)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, **config))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
