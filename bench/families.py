"""Each model family at its 7B decoder geometry: what pruning costs next to the pruned prefill, and what
it saves, with prefill.py's columns.

The decoder of each family's 7B release with random weights, fewer layers on a CPU (--layers, default
4): VideoLLaVA's Vicuna-7B (d 4096, 32 heads, MHA, vocabulary 32064); LLaVA-Video-7B's and
Qwen2.5-VL-7B's Qwen2-7B (d 3584, m 18944, 28 heads, 4 key/value heads, q/k/v biases, vocabulary
152064; Qwen2.5-VL with M-RoPE). The visual tokens come through each family's own code
(preprocessing, tower, projector, layout, positions) from a small random tower at the release's token
geometry: VideoLLaVA 257 a frame (224 px, patch 14, CLS), LLaVA-OneVision 196 a frame (384 px, patch 14,
pooled 2 x 2) + one newline, Qwen2.5-VL 256 per two frames (448 px frames, patch 14, merged 2 x 2) at
3-D positions; so every method sees the family's map, spans and positions. Every method is timed in the
same run, interleaved after a warm-up, median of --repeats.

    python bench/families.py                              # CPU: 4 layers, 8 frames, all three families
    python bench/families.py --family qwen2_5_vl --frames 32 --layers 28 --device cuda
"""

from __future__ import annotations

import numpy as np
import torch
from common import building, decoder_bytes, hardware, llama_7b, parse_args, require_memory, write_results
from prefill import print_table, run_once, summarize
from roofline import Machine
from transformers import (
    CLIPVisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

from lab.tiny import word_tokenizer
from lab.tiny_onevision import onevision_config, onevision_tokenizer
from lab.tiny_qwen import qwen2_5_vl_config, qwen_tokenizer
from vidsparse.models.family import ClipShape, VideoModel
from vidsparse.models.llava_onevision import LlavaOnevision
from vidsparse.models.qwen2_5_vl import Qwen25VL
from vidsparse.models.video_llava import VideoLlava
from vidsparse.models.visual import PromptEmbeds

WORDS = "what is happening in the video describe it please".split()
QUESTION = "what is happening in the video ? describe it please"
METHODS = ["fastv", "sparsevlm", "vidcom2", "fastvid", "dycoke-prefill", "stprune"]
QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
            "vocab_size": 152064, "max_position_embeddings": 32768}


def affordable(config, dtype: torch.dtype, device: torch.device) -> None:
    """Stop here, in one line, if this machine cannot hold `config`'s decoder."""
    text = config.text_config
    require_memory(decoder_bytes(text, dtype), f"{config.model_type} ({text.num_hidden_layers} decoder layers)",
                   device)


def build(family: str, layers: int, device: torch.device, dtype: torch.dtype) -> tuple[VideoModel, int]:
    """The family's model at its 7B decoder geometry (`layers` deep, a small random tower) and the frame
    side its clips are made at."""
    torch.manual_seed(0)
    with building(device, dtype):  # in its dtype: float32 first would hold twice the memory
        if family == "video_llava":
            tokenizer = word_tokenizer(WORDS)
            vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=224, patch_size=14)
            config = VideoLlavaConfig(vision_config=vision, text_config=llama_7b(
                layers, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id),
                video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
            affordable(config, dtype, device)
            model, wrapper, side = VideoLlavaForConditionalGeneration(_sdpa(config)), VideoLlava, 224
        elif family == "llava_onevision":
            tokenizer = onevision_tokenizer(WORDS)
            config = onevision_config(tokenizer, image_size=384, patch_size=14, vision_hidden=32,
                                      vision_layers=1, vision_heads=2)
            config.text_config = Qwen2Config(**QWEN2_7B, num_hidden_layers=layers,
                                             eos_token_id=config.text_config.eos_token_id,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
            affordable(config, dtype, device)
            model, wrapper, side = LlavaOnevisionForConditionalGeneration(_sdpa(config)), LlavaOnevision, 384
        else:
            tokenizer = qwen_tokenizer(WORDS)
            config = qwen2_5_vl_config(tokenizer, vision_hidden=32, vision_layers=1, fullatt_block_indexes=(0,),
                                       window_size=112)
            config.vision_config.out_hidden_size = QWEN2_7B["hidden_size"]
            config.text_config = Qwen2_5_VLTextConfig(
                **QWEN2_7B, num_hidden_layers=layers, eos_token_id=config.text_config.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
            affordable(config, dtype, device)
            model, wrapper, side = Qwen2_5_VLForConditionalGeneration(_sdpa(config)), Qwen25VL, 448
    mean, std = wrapper.default_pixel_stats()
    built = wrapper(model.eval(), tokenizer, f"{family} 7B-geometry ({layers} decoder layers)", mean, std)
    built.drop_unused()  # as loading a checkpoint does
    return built, side


def _sdpa(config):
    for part in (config, config.vision_config, config.text_config):
        part._attn_implementation = "sdpa"
    return config


def clip_prompt(model: VideoModel, frames: int, side: int) -> PromptEmbeds:
    """A clip of moving bright squares at `side` px, through the family's own steps to a prompt."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 60, (frames, side, side, 3), dtype=np.uint8)
    for t in range(frames):
        x = (t * side // frames) % (side - side // 4)
        video[t, side // 3 : side // 3 + side // 4, x : x + side // 4] = 255
    clip = ClipShape(frames, side, side, 2.0)
    with torch.inference_mode():
        features = model.video_features(model.preprocess(video), saliency=True)
        return model.embed(model.prompt_ids(QUESTION, clip), features, clip)


def main() -> None:
    def more(parser) -> None:
        parser.add_argument("--family", choices=["video_llava", "llava_onevision", "qwen2_5_vl"], action="append",
                            help="a family to measure (repeat for several; default: all three)")
        parser.add_argument("--frames", type=int, default=8)

    args, device, dtype, layers = parse_args(__doc__, repeats=3, more=more)
    machine = Machine.measure(device, dtype)
    machine_name = hardware(device)
    report = {"hardware": machine_name, "dtype": args.dtype, "layers": layers, "frames": args.frames,
              "matmul_peak_tflops": machine.peak_tflops, "bandwidth_gbs": machine.bandwidth_gbs, "families": {}}
    for family in args.family or ["video_llava", "llava_onevision", "qwen2_5_vl"]:
        model, side = build(family, layers, device, dtype)
        prompt = clip_prompt(model, args.frames, side)
        n = len(prompt.visual)
        configs = [("none", n), *[(m, round(0.1 * n)) for m in METHODS], ("sparsevlm", round(0.25 * n))]
        run_once(model.model, prompt, "none", n, 2)  # warm-up
        runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for method, budget in configs:  # interleaved: drift hits every method alike
                runs[(method, budget)].append(run_once(model.model, prompt, method, budget, args.new_tokens))
        rows = summarize(runs, machine, baseline=("none", n))
        print(f"\n{family}: {machine_name}, {args.dtype}, {layers}-layer 7B-width decoder, {args.frames} frames -> {n} "
              f"visual tokens + {prompt.embeds.shape[1] - n} other rows, median of {args.repeats} interleaved runs; "
              f"{machine.describe()}\n")
        print_table(rows)
        report["families"][family] = {"visual_tokens": n, "prompt_rows": prompt.embeds.shape[1], "rows": rows}
        del model, prompt, runs
    write_results(args.out, f"families-{device.type}-{layers}L-{args.frames}f.json", report)


if __name__ == "__main__":
    main()
