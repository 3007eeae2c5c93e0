"""What `batch` gains by paying for each clip once, on an MSVD-like workload (many questions a clip).

Rows, for each method, side by side in one run:
- `hf generate`: Hugging Face `generate()` per question, what evaluation harnesses run (`none` only);
- `per question`: `VideoQA.answer` for each question: vision tower and whole prefill every time
  (the path before clips were shared);
- `reuse`: `VideoQA.answer_clip`: a clip's vision tower and prompt head (text + visual block through
  the layers before the method's first question-guided stage) computed once for its questions;
- `clips together` (with fewer --questions a clip than a decoding batch, 16): what `batch` does with
  such clips (`batch.answered_jobs`): several clips prepared, then their questions decoded in one batch.
Clips are decoded once for every row (decoding is not what differs). The per-question rows are
timed on --sample questions of the first clip: their cost does not depend on what came before.

Columns: questions/s; speedup over `per question`; amortised FLOPs a question (prefill + vision,
the clip's shared work divided among its questions); the FLOPs limit of reuse (per-question FLOPs /
amortised FLOPs: the speedup reuse would reach if time followed FLOPs); the share of that limit
reached; the roofline limit (the same ratio of each path's least time on this machine, `Floor`: the
FLOPs at the measured matmul peak, and every pass of the decoder's weights at the measured memory
bandwidth, shared by the questions decoded together) and the share of it reached; peak memory;
whether every answer equals the per-question answer (for `hf generate`: the same tokens, where a
question's first differing step is not a near-tie in bfloat16: HF's logit for the token vidsparse
chose within one bf16 spacing of HF's top logit, which the two paths' rounding may order either way).

Two models: `--model 7b` (default): Video-LLaVA-7B geometry with random weights (CLIP ViT-L/14 tower,
7B-width decoder; on a CPU 3 layers and 4 frames so that it runs in minutes on 2 cores);
`--model demo`: the shipped ShapesQA model on ShapesQA clips with every question type.

    python bench/batch.py                       # 7B geometry, CPU defaults
    python bench/batch.py --model demo
    python bench/batch.py --clips 16 --questions 2   # a benchmark's few questions a video
    python bench/batch.py --device cuda --layers 32 --frames 8
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import build_7b, decoder_bytes, hardware, parse_args, write_results
from roofline import Machine

from vidsparse.answer import AskResult
from vidsparse.batch import ClipJob, answered_jobs
from vidsparse.datasets import shapes
from vidsparse.options import DECODE_BATCH, GROUP_MB, ask_options
from vidsparse.pipeline import VideoQA, clip_shape_of
from vidsparse.questions import Question
from vidsparse.stats import PeakMemory, synchronize
from vidsparse.video import DecodedVideo, decode_video

WORDS = "what is happening in the video who does it where and why how many people are there".split()
METHODS = "none,sparsevlm,stprune,vidcom2"  # fastv, dycoke, ... with --methods
BUDGET = "10%"


def more_options(parser) -> None:
    parser.add_argument("--model", choices=["7b", "demo"], default="7b")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--questions", type=int, default=25, help="questions a clip")
    parser.add_argument("--frames", type=int, default=None, help="default: 4 on CPU, 8 on GPU (7b); 8 (demo)")
    parser.add_argument("--sample", type=int, default=3, help="questions timed on the per-question rows")
    parser.add_argument("--methods", default=METHODS, help="comma-separated (default %(default)s)")
    parser.add_argument("--budget", default=BUDGET, help="every method's but none's (default %(default)s)")


def workload(kind: str, clips: int, per_clip: int, folder: Path) -> tuple[list[Path], list[list[str]]]:
    """`clips` clips and `per_clip` questions of varied length about each."""
    rng = np.random.default_rng(0)
    paths, questions = [], []
    for c in range(clips):
        path = folder / f"clip{c}.mp4"
        if kind == "7b":
            shapes.write_video(path, rng.integers(0, 256, (48, 240, 320, 3), dtype=np.uint8))
            asked = [" ".join(rng.choice(WORDS, int(rng.integers(4, 30)))) + " ?" for _ in range(per_clip)]
        else:
            clip = shapes.render_clip(rng, temporal="ordered")
            shapes.write_video(path, clip.frames)
            asked = []
            while len(asked) < per_clip:
                try:
                    asked.append(shapes.ask(clip, shapes.QUESTION_TYPES[len(asked) % len(shapes.QUESTION_TYPES)],
                                            rng)[0])
                except ValueError:  # this clip does not define that type: the next one
                    asked.append(shapes.ask(clip, "count", rng)[0])
        paths.append(path)
        questions.append(asked)
    return paths, questions


def timed(device, run, *args):
    """run(*args), its seconds and the peak memory while it ran."""
    memory = PeakMemory(device)
    memory.reset()
    synchronize(device)
    start = time.perf_counter()
    out = run(*args)
    synchronize(device)
    return out, time.perf_counter() - start, memory.peak_bytes()


@dataclass(frozen=True)
class HFAnswer:
    tokens: list[int]  # up to its EOS, excluded
    logits: list[torch.Tensor]  # each step's (vocab,) logits, float32


def hf_generate(qa: VideoQA, video: DecodedVideo, question: str, new_tokens: int) -> HFAnswer:
    """Transformers' own path: the processor's inputs, `generate()`, greedy, with each step's logits."""
    model = qa.model
    pixels = model.preprocess(video.frames).to(model.device, model.dtype)
    ids = model.prompt_ids(question, clip_shape_of(video))
    with torch.inference_mode():
        out = model.model.generate(input_ids=ids, pixel_values_videos=pixels[None], max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=sorted(model.eos_token_ids), pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    ended = next((i for i, t in enumerate(tokens) if t in model.eos_token_ids), len(tokens))
    return HFAnswer(tokens[:ended], [step[0].float().cpu() for step in out.logits])


def bf16_spacing(value: float) -> float:
    """The gap between adjacent bfloat16 numbers at `value` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7) if value else 2.0**-133


def agreement(ours: list[AskResult], theirs: list[HFAnswer], eos_token_ids: set[int]) -> str:
    """Whether vidsparse's greedy tokens are HF generate's, counting a question whose first differing
    step is a near-tie in bfloat16 (HF's logit for the token vidsparse chose there, or for EOS where its
    answer ended, within one bf16 spacing of HF's top logit: the two paths round differently, and either
    token is the model's answer at that precision) apart from one that differs beyond it. After the
    first difference the prompts differ, so nothing later is compared."""
    ties, beyond = 0, []
    for result, hf in zip(ours, theirs, strict=True):
        mine = result.token_ids
        if mine == hf.tokens:
            continue
        # The first step whose tokens differ (or where one of the two ended: its token was EOS).
        step = next((i for i, (a, b) in enumerate(zip(mine, hf.tokens, strict=False)) if a != b),
                    min(len(mine), len(hf.tokens)))
        logits = hf.logits[step]
        chosen = [mine[step]] if step < len(mine) else sorted(eos_token_ids)
        top, margin = float(logits.max()), float(logits.max() - logits[chosen].max())
        if margin <= bf16_spacing(top):
            ties += 1
        else:
            beyond.append(f"{margin / bf16_spacing(top):.1f}")
    if beyond:
        return f"NO: {len(beyond)} beyond bf16 ({', '.join(beyond)} spacings)"
    return "yes" if not ties else f"yes, {ties} near-tie(s)"


def amortised(results: list[AskResult]) -> float:
    return statistics.fmean(r.amortised_flops for r in results)


@dataclass(frozen=True)
class Floor:
    """The least time a question can take on this machine (the roofline, `Machine.seconds`): its FLOPs
    at the matmul peak, and each pass of the decoder's weights (the layers' and the LM head's) at the
    memory bandwidth, a pass being shared by the questions decoded together. The FLOPs limit leaves the
    passes out. (vidsparse counts a multiply-add as 1 FLOP, the machine's peak as 2.)"""

    machine: Machine
    pass_bytes: int

    def alone(self, r: AskResult) -> float:
        """`answer` per question: the tower, the whole prefill (at least one weight pass), then a weight
        pass for each token fed back."""
        return self.machine.seconds([(2 * r.vision_flops, 0), (2 * r.prefill_flops, self.pass_bytes),
                                     (0, r.generated_tokens * self.pass_bytes)])

    def shared(self, r: AskResult, share: float) -> float:
        """`answer_clip`: its share of the clip's tower and head, its own rows (at least its share of
        one weight pass for its group), and its `share` of each decoding step's pass."""
        clip = r.shared
        own = r.prefill_flops - clip.prefill_flops
        return self.machine.seconds([(2 * (clip.prefill_flops + clip.vision_flops) / clip.questions, 0),
                                     (2 * own, share * self.pass_bytes),
                                     (0, share * r.generated_tokens * self.pass_bytes)])


def main() -> None:
    args, device, dtype, layers = parse_args(__doc__, repeats=1, cpu_layers=3, new_tokens=3,
                                             more=more_options)
    if args.model == "7b":
        qa = build_7b(layers, device, dtype, WORDS)
        frames = args.frames or (8 if device.type == "cuda" else 4)
        geometry = f"7B-width decoder, {layers} layers, CLIP ViT-L/14 tower, random weights"
    else:
        qa = VideoQA.from_pretrained("shapes-demo", dtype=args.dtype, device=args.device)
        frames = args.frames or 8
        geometry = "the shipped ShapesQA model"
    with tempfile.TemporaryDirectory() as tmp:
        paths, questions = workload(args.model, args.clips, args.questions, Path(tmp))
        videos = [decode_video(p, frames) for p in paths]
    total_questions = sum(map(len, questions))
    machine = Machine.measure(device, dtype)
    text = qa.model.text_config
    embedding = text.vocab_size * text.hidden_size * torch.finfo(dtype).bits // 8  # a step reads a row of it
    floor = Floor(machine, decoder_bytes(text, dtype) - embedding)
    # A clip's questions are decoded in groups of DECODE_BATCH (25: 16 and 9): each group shares a pass.
    pass_share = math.ceil(args.questions / DECODE_BATCH) / args.questions
    jobs = [ClipJob(path, [Question(f"{c}-{i}", path, q) for i, q in enumerate(asked)])
            for c, (path, asked) in enumerate(zip(paths, questions, strict=True))]
    sample = questions[0][: args.sample]
    qa.answer(videos[0], sample[0], ask_options("none", "100%", None, "keep", 0, 0, frames, "auto", 1))  # warm-up
    rows = []
    for method in args.methods.split(","):
        budget = "100%" if method == "none" else args.budget
        options = ask_options(method, budget, None, "keep", 0, 0, frames, "auto", args.new_tokens)
        alone, seconds, peak = timed(device, lambda o: [qa.answer(videos[0], q, o) for q in sample], options)
        per_question = {"questions_per_s": len(sample) / seconds, "peak": peak,
                        "flops": statistics.fmean(r.prefill_flops + r.vision_flops for r in alone),
                        "floor_s": statistics.fmean(floor.alone(r) for r in alone)}
        if method == "none":
            answers, seconds, peak = timed(device, lambda: [hf_generate(qa, videos[0], q, args.new_tokens)
                                                            for q in sample])
            rows.append(row(method, budget, "hf generate", len(sample) / seconds, per_question, None, None, peak,
                            agreement(alone, answers, qa.model.eos_token_ids)))
        rows.append(row(method, budget, "per question", per_question["questions_per_s"], per_question,
                        per_question["flops"], per_question["floor_s"], per_question["peak"], "yes"))
        together, seconds, peak = timed(device, lambda o: [r for video, asked in zip(videos, questions, strict=True)
                                                           for r in qa.answer_clip(video, asked, o)], options)
        same = "yes" if [r.answer for r in together[: len(sample)]] == [r.answer for r in alone] else "NO"
        floor_s = statistics.fmean(floor.shared(r, pass_share) for r in together)
        rows.append(row(method, budget, "reuse", total_questions / seconds, per_question, amortised(together), floor_s,
                        peak, same))
        if args.questions < DECODE_BATCH:  # `batch` decodes several such clips in one batch
            grouped, seconds, peak = timed(device, lambda o: [r for _, results in answered_jobs(
                qa, zip(jobs, videos, strict=True), o, DECODE_BATCH, GROUP_MB * 2**20) for r in results], options)
            same = "yes" if [r.answer for r in grouped] == [r.answer for r in together] else "NO (vs reuse)"
            rows.append(row(method, budget, "clips together", total_questions / seconds, per_question,
                            amortised(grouped), None, peak, same))
    print(f"\n{hardware(device)}, {args.dtype}, {geometry}; {args.clips} clips x {args.questions} questions, "
          f"{frames} frames, {args.new_tokens} new tokens; per-question rows on {len(sample)} questions; "
          f"{machine.describe()}\n")
    header = ["method", "budget", "path", "questions/s", "speedup", "amortised TFLOPs", "FLOPs limit",
              "of limit", "roofline limit", "of roofline", "peak MB", "same answers"]
    print("  ".join(f"{h:>16}" for h in header))
    for r in rows:
        print("  ".join(f"{'-' if v is None else v!s:>16}" for v in r.values()))
    write_results(args.out, f"batch-{args.model}-{device.type}-{len(qa.model.decoder.layers)}L.json",
                  {"geometry": geometry, "frames": frames, "rows": rows})


def row(method: str, budget: str, path: str, rate: float, per_question: dict, flops: float | None,
        floor_s: float | None, peak: int | None, same: str) -> dict:
    speedup = rate / per_question["questions_per_s"]
    limit = per_question["flops"] / flops if flops else None
    roofline = per_question["floor_s"] / floor_s if floor_s else None
    return {"method": method, "budget": "-" if method == "none" else budget, "path": path,
            "questions_per_s": round(rate, 3), "speedup": round(speedup, 2),
            "amortised_tflops": None if flops is None else float(f"{flops / 1e12:.4g}"),
            "reuse_limit": None if limit is None else round(limit, 2),
            "of_limit": None if limit is None else round(speedup / limit, 2),
            "roofline_limit": None if roofline is None else round(roofline, 2),
            "of_roofline": None if roofline is None else round(speedup / roofline, 2),
            "peak_mb": None if peak is None else round(peak / 2**20), "same_answers": same}


if __name__ == "__main__":
    main()
