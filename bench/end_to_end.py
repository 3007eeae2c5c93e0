"""Whole `ask` runs, vanilla vs pruned, with the share of each stage, so the next bottleneck shows,
and the time to the first token (decoding the video, preprocessing, the tower, prefill with the
first token's logits).

The same Video-LLaVA-7B geometry as bench/prefill.py for the decoder (fewer layers on a CPU) and
the real video tower geometry (CLIP ViT-L/14: 24 layers, of which the 23 its projector reads run;
d=1024, 224 x 224 frames, 8 x 257 tokens), random weights, a real decoded clip, the same interleaved
timing (warm-up, median).

    python bench/end_to_end.py
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np
from common import build_7b, hardware, parse_args, write_results

from vidsparse.datasets.shapes import write_video

STAGES = ("decode_video", "preprocess", "vision", "prefill", "generate")
FIRST_TOKEN = STAGES[:4]  # prefill includes the first token's logits
# (method, budget, tower cut): 206 is 10% of 2056; the cuts are "depth" (after the tower's last read
# layer: the kept tokens' features unchanged, the projector's work on the others saved) and "half" (the
# tower's later half on the kept tokens only).
CONFIGS = [("none", 194, None), ("sparsevlm", 194, None), ("fastv", 194, None), ("fastvid", 194, None),
           ("stprune", 194, None), ("stprune", 206, None), ("stprune", 206, "depth"), ("stprune", 206, "half")]


def main() -> None:
    args, device, dtype, layers = parse_args(__doc__, repeats=3)
    qa = build_7b(layers, device, dtype, "what is happening in the video".split())
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        rng = np.random.default_rng(0)
        write_video(clip, rng.integers(0, 256, (48, 240, 320, 3), dtype=np.uint8))
        question = "what is happening in the video ?"
        ask = {"max_new_tokens": args.new_tokens}
        qa.ask(clip, question, **ask)  # warm-up
        depth = qa.model.tower_cutter().depth
        cuts = {None: None, "depth": depth, "half": depth // 2}
        runs: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
        for _ in range(args.repeats):
            for method, budget, cut in CONFIGS:
                result = qa.ask(clip, question, method=method, budget=budget, tower_cut=cuts[cut], **ask)
                runs[(method, budget, cut)].append({**result.seconds,
                                                    "first_token": sum(result.seconds[s] for s in FIRST_TOKEN)})
    rows = []
    base = runs[CONFIGS[0]]
    base_total = statistics.median(r["total"] for r in base)
    base_first = statistics.median(r["first_token"] for r in base)
    for method, budget, cut in CONFIGS:
        results = runs[(method, budget, cut)]
        medians = {s: statistics.median(r[s] for r in results) for s in (*STAGES, "total", "first_token")}
        rows.append({"method": method, "budget": None if method == "none" else budget, "tower_cut": cuts[cut],
                     "total_ms": round(1000 * medians["total"], 1),
                     "speedup": round(base_total / medians["total"], 3),
                     "first_token_ms": round(1000 * medians["first_token"], 1),
                     "first_token_speedup": round(base_first / medians["first_token"], 3),
                     **{f"{s}_share": round(medians[s] / medians["total"], 3) for s in STAGES}})
    print(f"\n{hardware(device)}, {args.dtype}, CLIP ViT-L/14 tower + {layers}-layer 7B-width decoder, 8 frames, "
          f"{args.new_tokens} new tokens, median of {args.repeats} interleaved runs\n")
    print(f"tower cut: the tower's layers from this one on (of {depth} the projector reads) on the kept tokens only")
    header = ["method", "budget", "tower cut", "total ms", "speedup", "1st token ms", "1st token x", *STAGES]
    print("  ".join(f"{h:>12}" for h in header))
    for r in rows:
        cut = "-" if r["tower_cut"] is None else r["tower_cut"]
        cells = [r["method"], r["budget"] or "-", cut, r["total_ms"], r["speedup"], r["first_token_ms"],
                 r["first_token_speedup"], *(f"{100 * r[f'{s}_share']:.1f}%" for s in STAGES)]
        print("  ".join(f"{c!s:>12}" for c in cells))
    write_results(args.out, f"end_to_end-{device.type}-{layers}L.json", {"layers": layers, "dtype": args.dtype,
                                                                          "rows": rows})


if __name__ == "__main__":
    main()
