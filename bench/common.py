"""What both benchmarks share: their command line and the Video-LLaVA-7B decoder geometry."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration
from transformers.utils import logging

# The benchmarks run from a clone (`python bench/prefill.py`), beside the lab they borrow a tiny tokenizer
# and the dtype probe from; the lab is not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.fast_dtype import fastest_dtype  # noqa: E402
from lab.tiny import word_tokenizer  # noqa: E402
from vidsparse.models.video_llava import VideoLlava  # noqa: E402
from vidsparse.pipeline import VideoQA  # noqa: E402


def hardware(device: torch.device) -> str:
    """The machine a figure came from: the GPU, or the CPU's model with the bfloat16 matmul units it has
    (one CPU here lacks them: bfloat16 is then 100x slower) and the threads torch uses. platform.processor()
    is empty on most Linux machines."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, units = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE).group(1).strip()
        flags = set(re.search(r"^flags\s*:(.*)$", info, re.MULTILINE).group(1).split())
        units = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    except (OSError, AttributeError):
        pass  # not Linux: the platform's name
    return f"{model}{f' ({units[0]})' if units else ''}, {torch.get_num_threads()} threads"


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
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the results as JSON into this folder (nothing is written unless asked)")
    more(parser)
    args = parser.parse_args()
    logging.set_verbosity_error()
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype, why = fastest_dtype(device)
        print(f"dtype: {args.dtype} (auto: {why})")
    return args, device, getattr(torch, args.dtype), args.layers or (32 if device.type == "cuda" else cpu_layers)


def write_results(out: Path | None, name: str, results: dict) -> None:
    """The results as `out`/`name`, only where --out asks for them: a run never rewrites tracked files."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {path}")


def decoder_bytes(text_config, dtype: torch.dtype) -> int:
    """The weights of a Llama/Qwen2-shaped decoder (embeddings and LM head, attention with its key/value
    groups, MLP) in `dtype`."""
    d, m, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    kv = d * (text_config.num_key_value_heads or text_config.num_attention_heads) // text_config.num_attention_heads
    params = 2 * text_config.vocab_size * d + layers * (2 * d * d + 2 * d * kv + 3 * d * m)
    return params * torch.finfo(dtype).bits // 8


def require_memory(weights: int, what: str, device: torch.device) -> None:
    """Say up front what a run needs (its weights, a quarter more and 1 GiB for activations) and refuse
    in one line, before allocating, where the machine has less available now."""
    needed = weights * 5 // 4 + 2**30
    print(f"{what}: needs about {needed / 2**30:.1f} GiB of {'host' if device.type == 'cpu' else 'device'} memory")
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        meminfo = Path("/proc/meminfo")
        if not meminfo.exists():
            return
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    if needed > available:
        raise SystemExit(f"{what} needs about {needed / 2**30:.1f} GiB but {available / 2**30:.1f} GiB is available "
                         "now: stop other jobs, or pass a smaller --layers")


def llama_7b(layers: int, **tokens: int) -> LlamaConfig:
    """Video-LLaVA-7B's decoder (d=4096, m=11008, 32 heads, vocabulary 32064), `layers` deep."""
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=4096, **tokens)


@contextmanager
def building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are made on `device` in `dtype` directly: 32 7B-width layers made in float32
    and then cast would need 26 GB first."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def build_7b(layers: int, device: torch.device, dtype: torch.dtype, words: list[str]) -> VideoQA:
    """Video-LLaVA-7B's geometry with random weights: the CLIP ViT-L/14 video tower (24 layers, d=1024,
    224 x 224 frames, 257 tokens a frame) and the 7B-width decoder `layers` deep; a word tokenizer."""
    tokenizer = word_tokenizer(words)
    text = llama_7b(layers, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    clip_vit_l = 303_000_000 * torch.finfo(dtype).bits // 8
    require_memory(decoder_bytes(text, dtype) + clip_vit_l, f"the 7B geometry ({layers} decoder layers, ViT-L)",
                   device)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14)
    config = VideoLlavaConfig(vision_config=vision, text_config=text,
                              video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with building(device, dtype):
        model = VideoLlavaForConditionalGeneration(config).eval()
    family = VideoLlava(model, tokenizer, f"7B-geometry ({layers} decoder layers)")
    family.drop_unused()  # as loading a checkpoint does: no image tower, no unread tower layer
    return VideoQA(family)
