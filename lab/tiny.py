"""Small VideoLLaVA models built from a config: the tests' models and the shipped demo model.

Both use a word-level tokenizer (the `tokenizers` library wrapped in PreTrainedTokenizerFast), so
that a checkpoint saved with `save_pretrained` loads through exactly the path users take for the
7B model: `VideoLlavaForConditionalGeneration.from_pretrained` + `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast, VideoLlavaConfig

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]
PROMPT_WORDS = ["user", "assistant", ":", "?", ".", ","]


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Lower-casing word-level tokenizer over `words` plus the prompt template's words.

    Encoding adds BOS like the Llama tokenizer; decoding joins words with spaces.
    """
    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, *PROMPT_WORDS, *words]:
        vocab.setdefault(word.lower() if word not in SPECIAL_TOKENS else word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"video_token": "<video>", "image_token": "<image>"},
    )


def video_llava_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    num_frames: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    kv_heads: int | None = None,
    rope_theta: float = 10000.0,
    max_positions: int = 1024,
    vision_feature_layer: int = -2,
) -> VideoLlavaConfig:
    """A VideoLLaVA config of the 7B model's shape (CLIP tower, 2-layer projector, Llama), only smaller.

    `vision_feature_layer=-2` is the 7B checkpoint's choice; the demo model may pick -1.
    """
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads or text_heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokens_per_frame = (image_size // patch_size) ** 2 + 1
    return VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=vision_feature_layer,
        image_seq_length=tokens_per_frame - 1,
        video_seq_length=tokens_per_frame * num_frames,
    )
