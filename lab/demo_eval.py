"""Evaluate a ShapesQA demo model: monitoring during training, and the held-out EVAL.md/EVAL.json.

Held-out evaluation goes through the real path: ``make_shapes`` mp4 files of a seed never used in
training -> ``decode_video`` -> ``preprocess_frames`` -> greedy ``generate``, exact match. Beside the
accuracy it measures, per question type, where the answer is read from the video: first-answer-token
accuracy with the visual tokens masked out as keys in every decoder layer after layer k. A type that
stays high with no visual tokens after layer 1 is answered within layers 0-1 and says nothing about
pruning after layer 1.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lab.yardsticks import Yardstick
from vidsparse.models.video_llava import prompt_text
from vidsparse.preprocess import preprocess_frames

DROP_AFTER_LAYER = 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Encoder:
    """Prompt and answer token ids, built like inference builds them (``prompt_ids``), and pixels."""

    pointer_targets = True  # the visual rows are 8 x (grid + CLS): the pointer losses' targets fit them
    patch = None  # the tower's patch size where it is not the data set's
    frames_per_patch = 1  # frames one patch token covers (Qwen2.5-VL: 2)

    def __init__(self, tok, n_visual: int):
        self.tok, self.n_visual = tok, n_visual
        self.video_id = tok.convert_tokens_to_ids("<video>")
        self._prompts: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            ids = self.tok(prompt_text(question, self.n_visual)).input_ids
            if ids.count(self.video_id) != self.n_visual:
                raise ValueError(f"the tokenizer split the video placeholder: {question!r}")
            self._prompts[question] = ids
        return self._prompts[question]

    def answer(self, answer: str) -> list[int]:
        return self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]

    def pixels(self, y: Yardstick, clips: list) -> torch.Tensor:
        return pixels(y, clips)

    def video_inputs(self, px: torch.Tensor, ids: torch.Tensor) -> dict:
        """The HF model's video inputs for a batch of prompts `ids` about clips whose pixels are `px`."""
        return {"pixel_values_videos": px}


class FamilyEncoder(Encoder):
    """Prompts and pixels of another vidsparse family (``VideoModel``), built by the family's own
    ``prompt_ids`` and ``preprocess``, exactly as inference builds them. Its visual rows are not
    VideoLLaVA's 8 x (16 + 1), so the pointer losses' per-object targets are not built."""

    pointer_targets = False

    def __init__(self, family, y: Yardstick):
        from vidsparse.models.family import ClipShape

        config = family.model.config
        self.family, self.tok = family, family.tokenizer
        self.clip = ClipShape(y.data.FRAMES, y.data.SIZE, y.data.SIZE, float(y.data.FPS))  # as the mp4 files say
        self.n_visual = family.visual_tokens(self.clip) + family.prompt_overhead(self.clip)
        self.video_id = family.placeholder(config)[1]
        self.patch = config.vision_config.patch_size
        self.frames_per_patch = getattr(config.vision_config, "temporal_patch_size", 1)
        self._prompts = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            self._prompts[question] = self.family.prompt_ids(question, self.clip)[0].tolist()
        return self._prompts[question]

    def pixels(self, y: Yardstick, clips: list) -> torch.Tensor:
        px = self.family.preprocess(np.concatenate([c.frames for c in clips]))
        return px.view(len(clips), -1, *px.shape[1:])  # frames, or Qwen2.5-VL's two-frame spans, a clip

    def video_inputs(self, px: torch.Tensor, ids: torch.Tensor) -> dict:
        return self.family.hf_video_inputs(px, ids, self.clip)


def pixels(y: Yardstick, clips: list) -> torch.Tensor:
    """(B, T, 3, S, S) through the inference preprocessing."""
    frames = np.concatenate([c.frames for c in clips])
    px = preprocess_frames(frames, y.data.SIZE)
    return px.view(len(clips), y.data.FRAMES, *px.shape[1:])


# ---------------------------------------------------------------- monitoring (in memory)
def quick_eval_sets(y: Yardstick, enc: Encoder, n: int) -> dict:
    """In-memory held-out sets (rendered frames, not mp4) for monitoring during training."""
    out = {}
    types = y.data.QUESTION_TYPES
    for qtype in types:
        rng = np.random.default_rng([y.monitor_seed, 2, types.index(qtype)])
        items = [y.monitor_clip(rng, qtype) for _ in range(n)]
        out[qtype] = (
            enc.pixels(y, [c for c, _, _ in items]),
            torch.tensor([enc.prompt(q) for _, q, _ in items]),
            torch.tensor([enc.answer(a)[0] for _, _, a in items]),
        )
    return out


@torch.no_grad()
def quick_eval(model, sets: dict, device, enc: Encoder, batch: int = 50) -> dict:
    model.eval()
    acc = {}
    for qtype, (px, ids, ans) in sets.items():
        right = 0
        for i in range(0, len(ids), batch):
            video = enc.video_inputs(px[i : i + batch], ids[i : i + batch])
            logits = model(
                input_ids=ids[i : i + batch].to(device),
                **{k: v.to(device) for k, v in video.items()},
                logits_to_keep=1,
            ).logits
            right += (logits[:, -1].argmax(-1).cpu() == ans[i : i + batch]).sum().item()
        acc[qtype] = round(right / len(ids), 3)
    model.train()
    return acc


# ---------------------------------------------------------------- evaluation through the real path
@torch.no_grad()
def first_token_logits(model, input_ids, pixel_values_videos, drop_visual_after: int | None = None):
    """Logits of the first answer token; with ``drop_visual_after=k`` the visual tokens are masked
    out as keys in every decoder layer after layer k (queries of layers k+1.. cannot see them)."""
    mm, lm = model.model, model.model.language_model
    emb = mm.get_input_embeddings()(input_ids)
    feats = mm.get_video_features(
        pixel_values_videos=pixel_values_videos,
        vision_feature_layer=model.config.vision_feature_layer,
        return_dict=True,
    ).pooler_output
    visual = input_ids == model.config.video_token_id
    emb = emb.masked_scatter(visual[..., None], feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
    b, t = input_ids.shape
    pos = torch.arange(t, device=emb.device)[None].expand(b, -1)
    rope = lm.rotary_emb(emb, position_ids=pos)
    neg = torch.finfo(emb.dtype).min
    causal = torch.full((t, t), neg, device=emb.device).triu(1)[None, None].expand(b, 1, t, t)
    blind = causal.masked_fill(visual[:, None, None, :], neg)
    h = emb
    for i, layer in enumerate(lm.layers):
        mask = blind if drop_visual_after is not None and i > drop_visual_after else causal
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
    return model.lm_head(lm.norm(h[:, -1]))


def load(out: Path, device):
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration

    model = VideoLlavaForConditionalGeneration.from_pretrained(out).to(device).eval()
    tok = AutoTokenizer.from_pretrained(out)
    return model, tok, Encoder(tok, model.config.video_seq_length)


def evaluate(
    y: Yardstick, out: Path, n: int, seed: int, device, data_dir: Path | None = None, backend: str = "auto"
) -> dict:
    from vidsparse.video import decode_video

    model, tok, enc = load(out, device)
    tmp = None
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="shapesqa-eval-"))
        data_dir = tmp
    qa_path = y.make(data_dir, n, seed)
    items = [json.loads(line) for line in qa_path.read_text().splitlines()]
    backends = Counter()
    by_type: dict[str, list] = {}
    for it in items:
        video = decode_video(
            data_dir / it["video"],
            num_frames=model.config.video_seq_length // (model.config.image_seq_length + 1),
            backend=backend,
        )
        backends[video.backend] += 1
        px = preprocess_frames(video.frames, model.config.vision_config.image_size)
        by_type.setdefault(it["type"], []).append((px, enc.prompt(it["question"]), it["answer"]))
    results, t0 = {}, time.time()
    for qtype, rows in by_type.items():
        right = right_reversed = 0
        n_layers = model.config.text_config.num_hidden_layers
        right_blind = dict.fromkeys(range(-1, n_layers - 1), 0)  # -1: no visual tokens in any layer
        for i in range(0, len(rows), 25):
            chunk = rows[i : i + 25]
            ids = torch.tensor([r[1] for r in chunk], device=device)
            px = torch.stack([r[0] for r in chunk]).to(device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values_videos=px,
                max_new_tokens=12,
                do_sample=False,
            )
            answers = tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
            right += sum(a.strip() == r[2] for a, r in zip(answers, chunk, strict=True))
            for k in right_blind:
                blind = first_token_logits(model, ids, px, drop_visual_after=k).argmax(-1).cpu()
                right_blind[k] += sum(tok.decode([int(p)]).strip() == r[2] for p, r in zip(blind, chunk, strict=True))
            if qtype in y.data.TEMPORAL_TYPES:  # the same clips played backwards: a time-blind model would not notice
                rev = first_token_logits(model, ids, px.flip(1)).argmax(-1).cpu()
                right_reversed += sum(tok.decode([int(p)]).strip() == r[2] for p, r in zip(rev, chunk, strict=True))
        results[qtype] = {
            "n": len(rows),
            "accuracy": round(right / len(rows), 3),
            "no_visual_after_layer1": round(right_blind[DROP_AFTER_LAYER] / len(rows), 3),
            "chance": round(y.data.CHANCE[qtype], 3),
            "no_visual_after_layer": {str(k): round(v / len(rows), 3) for k, v in right_blind.items()},
        }
        if qtype in y.data.TEMPORAL_TYPES:
            results[qtype]["frames_reversed"] = round(right_reversed / len(rows), 3)
    types = list(results.values())
    total = sum(r["n"] for r in types)

    def mean(key):
        return round(sum(r[key] * r["n"] for r in types) / total, 3)

    results["overall"] = {
        "n": total,
        "accuracy": mean("accuracy"),
        "no_visual_after_layer1": mean("no_visual_after_layer1"),
        "chance": mean("chance"),
        "no_visual_after_layer": {
            k: round(sum(r["no_visual_after_layer"][k] * r["n"] for r in types) / total, 3)
            for k in types[0]["no_visual_after_layer"]
        },
    }
    log(f"evaluated {total} questions in {time.time() - t0:.0f}s (decoded with {dict(backends)})")
    if tmp is not None:
        shutil.rmtree(tmp)
    return {"results": results, "eval_seed": seed, "decode_backends": dict(backends)}


def evaluate_family(
    y: Yardstick, out: Path, n: int, seed: int, device, data_dir: Path | None = None, backend: str = "auto"
) -> dict:
    """Held-out accuracy per question type of a checkpoint of another family, through the real path:
    ``make_shapes`` mp4 -> ``decode_video`` -> the family's ``preprocess`` and ``prompt_ids`` -> greedy HF
    ``generate`` -> decode, exact match. (The where-is-it-read probes are VideoLLaVA's only.)"""
    from vidsparse.models.loading import load_family
    from vidsparse.video import decode_video

    family = load_family(None, str(out), "float32", str(device))
    enc = FamilyEncoder(family, y)
    model, tok = family.model.eval(), family.tokenizer
    tmp = None
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="shapesqa-eval-"))
        data_dir = tmp
    items = [json.loads(line) for line in y.make(data_dir, n, seed).read_text().splitlines()]
    backends = Counter()
    by_type: dict[str, list] = {}
    for it in items:
        video = decode_video(data_dir / it["video"], num_frames=y.data.FRAMES, backend=backend)
        backends[video.backend] += 1
        by_type.setdefault(it["type"], []).append((family.preprocess(video.frames), enc.prompt(it["question"]),
                                                   it["answer"]))
    results, t0 = {}, time.time()
    with torch.no_grad():
        for qtype, rows in by_type.items():
            right = 0
            for i in range(0, len(rows), 25):
                chunk = rows[i : i + 25]
                ids = torch.tensor([r[1] for r in chunk], device=device)
                px = torch.stack([r[0] for r in chunk]).to(device)
                video = {k: v.to(device) for k, v in enc.video_inputs(px, ids).items()}
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **video,
                                     max_new_tokens=12, do_sample=False, eos_token_id=sorted(family.eos_token_ids))
                answers = tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
                right += sum(a.strip() == r[2] for a, r in zip(answers, chunk, strict=True))
            results[qtype] = {"n": len(rows), "accuracy": round(right / len(rows), 3),
                              "chance": round(y.data.CHANCE[qtype], 3)}
    total = sum(r["n"] for r in results.values())
    results["overall"] = {
        "n": total,
        "accuracy": round(sum(r["accuracy"] * r["n"] for r in results.values()) / total, 3),
        "chance": round(sum(r["chance"] * r["n"] for r in results.values()) / total, 3),
    }
    log(f"evaluated {total} questions in {time.time() - t0:.0f}s (decoded with {dict(backends)})")
    if tmp is not None:
        shutil.rmtree(tmp)
    path = (f"`{type(family).__name__}.preprocess` and `prompt_ids` -> greedy `generate` -> "
            "`decode(skip_special_tokens=True)`; exact match.")
    return {"results": results, "eval_seed": seed, "decode_backends": dict(backends), "path": path}


def sanity_check_masking(y: Yardstick, out: Path, device) -> float:
    """The manual layer loop without masking must reproduce the model's own forward."""
    model, _, enc = load(out, device)
    px, ids, _ = quick_eval_sets(y, enc, 4)["first"]
    with torch.no_grad():
        ref = model(input_ids=ids.to(device), pixel_values_videos=px.to(device), logits_to_keep=1).logits[:, -1]
    mine = first_token_logits(model, ids.to(device), px.to(device))
    return (ref - mine).abs().max().item()


def write_report(y: Yardstick, out: Path, report: dict) -> None:
    (out / "EVAL.json").write_text(json.dumps(report, indent=1) + "\n")
    res = report["evaluation"]["results"]
    lines = [
        f"# {y.title}: measured numbers",
        "",
        f"Held-out set: `{y.make.__name__}(n={res['overall']['n']}, seed={report['evaluation']['eval_seed']})`",
        "(a seed never used in training), scored through the real path: mp4 -> `decode_video` ->",
        report["evaluation"].get("path", "`preprocess_frames` -> greedy `generate` -> "
                                 "`decode(skip_special_tokens=True)`; exact match."),
        "`no visual after L1`: the same questions with every visual token masked out as a key in decoder",
        "layers 2.. (first answer token, argmax). A type that stays high there is answered within layers 0-1",
        "and is a weak probe for pruning after layer 1. Chance: uniform guess over the answers the question",
        "allows, without the video.",
        "",
        "| type | n | accuracy | no visual after L1 | chance |",
        "|---|---|---|---|---|",
    ]
    for qtype, r in res.items():
        blind = f"{r['no_visual_after_layer1']:.3f}" if "no_visual_after_layer1" in r else "-"
        lines.append(f"| {qtype} | {r['n']} | {r['accuracy']:.3f} | {blind} | {r['chance']:.3f} |")
    layers = list(res["overall"].get("no_visual_after_layer", []))
    lines += [] if not layers else [
        "",
        "Where the answer is read from the video: first-answer-token accuracy when the visual tokens are",
        "masked out as keys in every decoder layer after layer k (k = -1: the video is never seen; the",
        "last decoder layer is omitted: that is the full model).",
        "",
        "| type | " + " | ".join("never" if k == "-1" else f"after L{k}" for k in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for qtype, r in res.items() if layers else ():
        lines.append(f"| {qtype} | " + " | ".join(f"{r['no_visual_after_layer'][k]:.3f}" for k in layers) + " |")
    for qtype, r in res.items():
        if "frames_reversed" in r:
            lines += [
                "",
                f"`{qtype}` with the frames of each clip in reverse order (same answers expected): "
                f"{r['frames_reversed']:.3f} (a model blind to frame order would score as high as forwards; the",
                "reversed clip's own answer can coincide with the forward one).",
            ]
    t = report.get("training")
    if t:
        monitored = [k for k in t["history"][0] if k not in ("step", "minutes", "loss")] if t["history"] else []
        tower_note = "" if t.get("tower_in_qa", True) else " (the tower frozen during QA)"
        lines += [
            "",
            f"Training: `{t['command']}`, {t['minutes']:.1f} min on {t['device']} ({t['threads']} threads),",
            f"video tower pretraining {t['tower_steps']} steps, QA {t['qa_steps']} steps of batch {t['batch']}"
            + (f", then cycles of {' + '.join(map(str, t['cycle_steps']))} steps" if t.get("cycle_steps") else "")
            + f"{tower_note}.",
            f"Tower held-out per-patch metrics: {t['tower_metrics']}.",
        ]
        if t.get("bf16"):
            lines.append("Mixed precision: bfloat16 autocast in training (float32 weights; evaluated in float32).")
        if t.get("resumed"):
            lines.append(f"Resumed from a saved training state {t['resumed']} time(s) (same result as one run).")
        lines += [
            "",
            "Monitoring (in-memory held-out clips, first answer token):",
            "",
            "| step | minutes | loss | " + " | ".join(monitored) + " |",
            "|---|---|---|" + "---|" * len(monitored),
        ]
        for h in t["history"]:
            lines.append(
                f"| {h['step']} | {h['minutes']} | {h['loss']} | " + " | ".join(f"{h[q]:.3f}" for q in monitored) + " |"
            )
    (out / "EVAL.md").write_text("\n".join(lines) + "\n")
