"""What both benchmarks share: their command line and the Video-LLaVA-7B decoder geometry."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.utils import logging


def parse_args(doc: str, repeats: int) -> tuple[argparse.Namespace, torch.device, torch.dtype, int]:
    """(args, device, dtype, decoder layers: 4 on a CPU, all 32 on a GPU unless --layers says)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on CPU, 32 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.set_verbosity_error()
    device = torch.device(args.device)
    return args, device, getattr(torch, args.dtype), args.layers or (32 if device.type == "cuda" else 4)


def llama_7b(layers: int, **tokens: int) -> LlamaConfig:
    """Video-LLaVA-7B's decoder (d=4096, m=11008, 32 heads, vocabulary 32064), `layers` deep."""
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=4096, **tokens)
