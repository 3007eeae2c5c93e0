"""What both benchmarks share: their command line and the Video-LLaVA-7B decoder geometry."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration
from transformers.utils import logging

from vidsparse.models.tiny import word_tokenizer
from vidsparse.models.video_llava import VideoLlava
from vidsparse.pipeline import VideoQA


def parse_args(doc: str, repeats: int, cpu_layers: int = 4, new_tokens: int = 8,
               more: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
               ) -> tuple[argparse.Namespace, torch.device, torch.dtype, int]:
    """(args, device, dtype, decoder layers: `cpu_layers` on a CPU, all 32 on a GPU unless --layers
    says); `more` adds a benchmark's own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None,
                        help=f"decoder layers (default: {cpu_layers} on CPU, 32 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on a GPU that has it; on a CPU whichever matmul is faster here")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    more(parser)
    args = parser.parse_args()
    logging.set_verbosity_error()
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype, why = fastest_dtype(device)
        print(f"dtype: {args.dtype} (auto: {why})")
    return args, device, getattr(torch, args.dtype), args.layers or (32 if device.type == "cuda" else cpu_layers)


def fastest_dtype(device: torch.device) -> tuple[str, str]:
    """The dtype to benchmark in, and why. A CPU without native bfloat16 (AVX2 only) runs a bf16 matmul
    over 100x slower than fp32, so on a CPU both are timed on a small matmul and the faster wins."""
    if device.type == "cuda":
        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return name, f"{torch.cuda.get_device_name(device)} {'supports' if name == 'bfloat16' else 'lacks'} bf16"
    rates = {name: matmul_rate(getattr(torch, name)) for name in ("bfloat16", "float32")}
    best = max(rates, key=rates.get)
    return best, ", ".join(f"{name} matmul {rate:.3f} TFLOP/s" for name, rate in rates.items()) + " on this CPU"


def matmul_rate(dtype: torch.dtype, size: int = 512) -> float:
    """Best of 3 timings of a size^3 matmul, in TFLOP/s (2 per multiply-add); small enough to take
    about a second even where the dtype has no native support."""
    a = torch.randn(size, size, dtype=dtype)
    a @ a
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def llama_7b(layers: int, **tokens: int) -> LlamaConfig:
    """Video-LLaVA-7B's decoder (d=4096, m=11008, 32 heads, vocabulary 32064), `layers` deep."""
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=4096, **tokens)


def build_7b(layers: int, device: torch.device, dtype: torch.dtype, words: list[str]) -> VideoQA:
    """Video-LLaVA-7B's geometry with random weights: the CLIP ViT-L/14 video tower (24 layers, d=1024,
    224 x 224 frames, 257 tokens a frame) and the 7B-width decoder `layers` deep; a word tokenizer."""
    tokenizer = word_tokenizer(words)
    text = llama_7b(layers, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14)
    config = VideoLlavaConfig(vision_config=vision, text_config=text,
                              video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = VideoLlavaForConditionalGeneration(config).to(dtype).eval()
    model.model.image_tower = None
    return VideoQA(VideoLlava(model, tokenizer, f"7B-geometry ({layers} decoder layers)"))
