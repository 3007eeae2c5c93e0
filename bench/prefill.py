"""How close pruned prefill gets to its FLOPs limit, what pruning costs, and what it saves.

A Video-LLaVA-7B-shaped decoder (d=4096, m=11008, 32 heads, vocab 32064) with random weights and
8 x 257 visual tokens; fewer layers on a CPU (--layers, default 4), all 32 on a GPU. Every method
is timed in the same run, interleaved (none, A, B, ..., none, A, B, ...) after a warm-up, median of
--repeats. The machine's dense-matmul peak and memory bandwidth are measured first: each speedup is
read against two limits, the FLOPs ratio and the roofline ratio (each layer at least max(FLOPs / peak,
bytes / bandwidth), bench/roofline.py), which a pruned prefill of a few hundred tokens can reach.

    python bench/prefill.py                   # CPU: 4 layers, the faster of bfloat16 / float32 here
    python bench/prefill.py --layers 32 --device cuda
"""

from __future__ import annotations

import statistics

import torch
from common import building, decoder_bytes, hardware, llama_7b, parse_args, require_memory, write_results
from roofline import Machine, prefill_work
from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from vidsparse.decoding import generate
from vidsparse.models.video_llava import visual_map
from vidsparse.models.visual import PromptEmbeds
from vidsparse.pruning import make_plan
from vidsparse.stats import DecoderShape, PeakMemory, StageTimer, prefill_flops

CONFIGS = [("none", 2056), ("fastv", 194), ("sparsevlm", 194), ("fastv", 64), ("sparsevlm", 64), ("vidcom2", 194),
           ("fastvid", 194), ("dycoke", 194), ("dycoke-prefill", 194), ("holitom", 194), ("flashvid", 194),
           ("stprune", 194)]
FRAMES, TOKENS_PER_FRAME, PREFIX, SUFFIX = 8, 257, 5, 24  # "USER: <video>" ... "{question} ASSISTANT:"


def build_decoder(layers: int, device: torch.device, dtype: torch.dtype) -> VideoLlavaForConditionalGeneration:
    text = llama_7b(layers)
    require_memory(decoder_bytes(text, dtype), f"the 7B decoder ({layers} layers)", device)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=224, patch_size=14)  # unused: the visual tokens are given directly
    config = VideoLlavaConfig(vision_config=vision, text_config=text)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with building(device, dtype):
        return VideoLlavaForConditionalGeneration(config).eval()


def synthetic_prompt(model, device, dtype) -> PromptEmbeds:
    """Random text ids around 2056 visual features scaled like projector outputs."""
    n_visual = FRAMES * TOKENS_PER_FRAME
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (1, PREFIX + n_visual + SUFFIX), generator=generator).to(device)
    with torch.inference_mode():
        embeds = model.model.language_model.embed_tokens(ids)
        embeds[0, PREFIX : PREFIX + n_visual] = (torch.randn(n_visual, 4096, generator=generator) * 0.02).to(
            device, dtype)
    words = [f"w{i}" for i in range(SUFFIX)]
    # What the video tower would give FastVID: CLS attention over each frame, a CLS embedding per frame.
    saliency = torch.rand(FRAMES, TOKENS_PER_FRAME, generator=generator).softmax(-1).flatten().to(device)
    frame_features = torch.randn(FRAMES, 1024, generator=generator).to(device)
    rope = torch.arange(ids.shape[1], device=device)[None, None]
    return PromptEmbeds(ids, embeds, visual_map(torch.arange(PREFIX, PREFIX + n_visual), FRAMES, 16), rope,
                        PREFIX + n_visual, PREFIX + n_visual, PREFIX + n_visual - 1, words, saliency, frame_features)


def run_once(model, prompt, method: str, budget: int, new_tokens: int) -> dict:
    decoder = model.model.language_model
    device = prompt.embeds.device
    timer, memory = StageTimer(device), PeakMemory(device)
    memory.reset()
    baseline = memory.current_bytes()
    plan = make_plan(method, budget, len(decoder.layers))
    generation = generate(decoder, model.lm_head, prompt, new_tokens, set(), timer, plan)
    prefilled, decoded = generation.prefilled, generation.decoded
    return {
        "prefill_s": timer.seconds["prefill"],
        "pruning_s": timer.seconds.get("pruning", 0.0),
        "decode_ms_per_token": 1000 * decoded.seconds / decoded.steps if decoded.steps else None,
        "peak_bytes": memory.peak_bytes(),
        "working_bytes": memory.peak_bytes() - baseline,
        "kv_bytes": prefilled.kv_bytes(decoded.steps),
        "flops": prefill_flops(prefilled.tokens_per_layer, DecoderShape.of(decoder)),
        "work": prefill_work(prefilled.tokens_per_layer, DecoderShape.of(decoder), prompt.embeds.element_size(),
                             model.lm_head.out_features),
        "equivalent": statistics.fmean(prefilled.visual_per_layer),
    }


def main() -> None:
    args, device, dtype, layers = parse_args(__doc__, repeats=5)
    machine = Machine.measure(device, dtype)
    model = build_decoder(layers, device, dtype)
    prompt = synthetic_prompt(model, device, dtype)
    run_once(model, prompt, "none", 2056, 2)  # warm-up
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for method, budget in CONFIGS:  # interleaved: drift hits every method alike
            runs[(method, budget)].append(run_once(model, prompt, method, budget, args.new_tokens))
    rows = summarize(runs, machine)
    machine_name = hardware(device)
    print(f"\n{machine_name}, {args.dtype}, {layers}-layer 7B-width decoder, 8 x 257 visual tokens + {PREFIX + SUFFIX} "
          f"text, median of {args.repeats} interleaved runs; {machine.describe()}\n")
    print_table(rows)
    write_results(args.out, f"prefill-{device.type}-{layers}L.json", {
        "hardware": machine_name, "dtype": args.dtype, "layers": layers, "matmul_peak_tflops": machine.peak_tflops,
        "bandwidth_gbs": machine.bandwidth_gbs, "rows": rows})


def summarize(runs: dict[tuple[str, int], list[dict]], machine: Machine,
              baseline: tuple[str, int] = ("none", 2056)) -> list[dict]:
    median = statistics.median
    base = runs[baseline]
    base_prefill = median(r["prefill_s"] for r in base)
    base_peak = median(r["peak_bytes"] for r in base) if base[0]["peak_bytes"] else None
    rows = []
    for (method, budget), results in runs.items():
        prefill = median(r["prefill_s"] for r in results)
        flops_ratio = base[0]["flops"] / results[0]["flops"]
        roofline_ratio = machine.seconds(base[0]["work"]) / machine.seconds(results[0]["work"])
        speedup = base_prefill / prefill
        peak_bytes = median(r["peak_bytes"] for r in results) if results[0]["peak_bytes"] else None
        working = median(r["working_bytes"] for r in results) if results[0]["peak_bytes"] else None
        rows.append({
            "method": method, "budget": budget if method != "none" else None,
            "equivalent_tokens": round(results[0]["equivalent"], 1),
            "flops_ratio": round(flops_ratio, 3), "prefill_ms": round(1000 * prefill, 1),
            "speedup": round(speedup, 3), "fraction_of_limit": round(speedup / flops_ratio, 3),
            "roofline_ratio": round(roofline_ratio, 3), "of_roofline": round(speedup / roofline_ratio, 3),
            "overhead_pct": round(100 * median(r["pruning_s"] for r in results) / prefill, 2),
            "peak_mb": None if peak_bytes is None else round(peak_bytes / 2**20, 1),
            "peak_vs_none": None if peak_bytes is None or not base_peak else round(peak_bytes / base_peak, 3),
            "working_mb": None if working is None else round(working / 2**20, 1),
            "kv_mb": round(results[0]["kv_bytes"] / 2**20, 2),
            "decode_ms_per_token": None if results[0]["decode_ms_per_token"] is None else round(
                median(r["decode_ms_per_token"] for r in results), 2),
            "achieved_tflops": round(2 * results[0]["flops"] / prefill / 1e12, 3),
            "fraction_of_peak": round(2 * results[0]["flops"] / prefill / 1e12 / machine.peak_tflops, 3),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    columns = [("method", "method"), ("budget", "budget"), ("equivalent_tokens", "equiv tok"),
               ("flops_ratio", "FLOPs x"), ("prefill_ms", "prefill ms"), ("speedup", "speedup"),
               ("fraction_of_limit", "of limit"), ("roofline_ratio", "roofline x"), ("of_roofline", "of roofline"),
               ("overhead_pct", "overhead %"), ("peak_mb", "peak MB"),
               ("peak_vs_none", "peak/none"), ("working_mb", "run MB"), ("kv_mb", "KV MB"),
               ("decode_ms_per_token", "decode ms/tok"),
               ("achieved_tflops", "TFLOP/s"), ("fraction_of_peak", "of peak")]
    widths = [max(len(title), *(len(str(r[key])) for r in rows)) for key, title in columns]
    print("  ".join(title.rjust(w) for (_, title), w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[key] if r[key] is not None else "-").rjust(w)
                        for (key, _), w in zip(columns, widths, strict=True)))


if __name__ == "__main__":
    main()
