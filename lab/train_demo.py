"""Train a ShapesQA demo model: a small but genuine VideoLlavaForConditionalGeneration.

    python -m lab.train_demo --out vidsparse/shipped/shapes-videollava                    # ShapesQA (136 tokens)
    python -m lab.train_demo --yardstick hd --out vidsparse/shipped/shapes-hd-videollava  # ShapesQA-HD (520 tokens)
    python -m lab.train_demo --yardstick hd --resume   # continue a killed run where it stopped
    python -m lab.train_demo --out vidsparse/shipped/shapes-videollava --eval-only
    python -m lab.train_demo --family llava_onevision --resume --save-minutes 5  # vidsparse/shipped/shapes-onevision
    python -m lab.train_demo --family qwen2_5_vl --resume --save-minutes 5       # vidsparse/shipped/shapes-qwen

``--yardstick`` picks the data set, architecture, task mix, seeds and default step counts
(``lab.yardsticks``); everything else is shared. ``--family llava_onevision`` trains the same recipe
(tower stage, then the QA stage; no cycles) on a LlavaOnevisionForConditionalGeneration of the yardstick's
``onevision_arch`` (``lab.tiny_onevision.onevision_config``), with prompts and pixels built by the
family's own ``prompt_ids`` and ``preprocess`` (``vidsparse.models.llava_onevision``) and HF's own forward;
its tower heads read every SigLIP token of the feature layer (there is no CLS), and its evaluation
(``demo_eval.evaluate_family``) is accuracy per type through the same path (VideoLLaVA's
where-is-it-read probes are not run). ``--family qwen2_5_vl`` trains a Qwen2_5_VLForConditionalGeneration
of ``qwen_arch`` the same way, fed as Qwen's processor feeds it (``VideoModel.hf_video_inputs``: flat
patches, grids, token types, seconds a temporal patch at the clips' 8 fps), its tower-stage heads reading
every patch of the merger's input put back in raster order (``qwen_patch_states``), each patch predicting
both frames it covers, and saves its pixel bounds (``qwen_pixels``) as the checkpoint's
video_preprocessor_config.json.
The default, ``video_llava``, is unchanged.

Recipe (fixed seeds and step counts, so a run is reproducible on one machine):

1. Dense pretraining of the video tower (``--tower-steps``): temporary heads on every patch token
   of the layer VideoLLaVA feeds the projector predict the patch's colour class, shape class
   (background = 0) and the centre of the object covering it, from the renderer's masks. Nothing
   is supervised on the CLS tokens (a CLS count head would make "how many" answerable from CLS
   alone). The heads are thrown away.
2. Question answering (``--qa-steps``): projector + Llama (+ the tower at lr/10 after it has been
   frozen for the first ``--tower-freeze`` steps, where the yardstick trains it at all) on all
   question types at once plus two auxiliary answers, "describe the objects ?" (colour-ordered
   "red circle blue square") and "describe the shapes ?" (shape-ordered "square blue circle red";
   each order teaches one direction of the colour <-> shape binding), loss on the answer tokens
   only, with a curriculum (at most 3 objects during the first 20% of the steps). Prompts are built
   by ``vidsparse.models.video_llava.prompt_text``, pixels by ``vidsparse.preprocess.preprocess_frames``
   from the exact uint8 frames that the data set's mp4 files store, so training matches inference.
   Where the yardstick sets ``pointer_weight`` (HD), an auxiliary loss on colour/shape batches
   points one early head at the asked object from the answer position, faded out by
   ``pointer_until`` of the steps (``lab.pointer_loss`` says why). Where it sets
   ``temporal_from`` (HD), the last part of the QA steps is a temporal phase: its own task mix, and
   linear heads on the early residuals of the visual tokens learn their frame index and their
   object's onset, order of appearance and motion (``lab.temporal_facts`` says why).
3. Further cycles (``yardsticks.Cycle``, where the yardstick has them: HD), each with the learning
   rate warmed up again and decayed over its own cosine, its own task mix, fresh heads for its own
   facts (the colours each frame shows and loses; in the last five, the order of events so far), from
   the second on a loss that teaches two early heads to look at the same place one frame back, in the
   last six random visual-key dropout, in the last four order questions asked on close calls, and in
   the last two, half their motion questions on clips where every number of moving objects is equally
   common; the last keeps only 5-30% of the clip from layer 2 on in its dropped samples. The
   first schedule had decayed to a twentieth of its peak while "disappears" and "moving" were still
   near chance.

``--init DIR --from-cycle K`` continues a checkpoint this module trained with cycles K.. only (after
``--qa-steps`` QA-stage steps; no tower stage); its EVAL.json's training record goes on from DIR's.
The shipped HD model's last five cycles were trained that way, each on the previous release's weights
(the last three with ``--train-seed 8``, ``12`` and ``13``, so that their clips are not those an earlier
cycle drew).

Every ``--save-minutes`` the whole training state (model, optimizer, step, RNG states, monitoring
history) is written to ``<out>/train_state.pt``; ``--resume`` continues from it, with the same
result as a run that was never interrupted. The file is deleted once EVAL.md is written.

History of the first model (all on this 2-core CPU): with only the colour-ordered description,
colour questions stayed at ~0.35 after 1250 QA steps while shape questions reached 1.0. Adding the
shape-ordered description fixed that (all four types at 1.00 on 500 held-out questions after 3600
steps), but in that model color and shape were fully answered with no visual tokens after decoder
layer 1 (1.00 and 1.00; first 0.88, count 0.47): poor pruning probes. Adding "second" (a two-step
temporal question) gave the shipped model, whose color, count, first and second answers all need
visual tokens after layer 1 (see its EVAL.md).

The evaluation (``lab.demo_eval``) writes ``EVAL.json`` and ``EVAL.md`` next to the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

# Set before torch loads OpenMP. With busy-waiting (the default) two training threads on a 2-core
# machine run several times slower whenever another process holds a core (measured: 10 s instead of
# 2.5 s a step); passive waiting does not change any result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lab.demo_eval import (  # noqa: E402
    Encoder,
    FamilyEncoder,
    evaluate,
    evaluate_family,
    log,
    pixels,
    quick_eval,
    quick_eval_sets,
    sanity_check_masking,
    write_report,
)
from lab.fast_dtype import fastest_dtype  # noqa: E402
from lab.key_dropout import KeyDropout, draw_drops  # noqa: E402
from lab.pointer_loss import (  # noqa: E402
    AuxLosses,
    FramePointer,
    answer_object,
    asked_object,
    asked_word,
    object_tokens,
)
from lab.temporal_facts import TemporalFacts, fact_targets  # noqa: E402
from lab.tiny import video_llava_config, word_tokenizer  # noqa: E402
from lab.yardsticks import YARDSTICKS, Yardstick  # noqa: E402
from vidsparse.datasets import shapes  # noqa: E402

TRAIN_SEED = 1  # training draws from [--train-seed, stage]; held-out and monitoring seeds are the yardstick's
N_PATCH_CLASSES = {"color": len(shapes.COLORS) + 1, "shape": len(shapes.SHAPES) + 1}
STATE_FILE = "train_state.pt"


FAMILY_NAMES = ("video_llava", "llava_onevision", "qwen2_5_vl")  # --family: the families this trainer builds
# Per family other than VideoLLaVA, the yardstick fields holding its architecture and checkpoint folder.
FAMILY_FIELDS = {"llava_onevision": ("onevision_arch", "onevision_out"), "qwen2_5_vl": ("qwen_arch", "qwen_out")}


def build(y: Yardstick, device: torch.device, family: str = "video_llava"):
    from transformers import VideoLlavaForConditionalGeneration

    if family == "llava_onevision":
        from transformers import LlavaOnevisionForConditionalGeneration

        from lab.tiny_onevision import onevision_config, onevision_tokenizer

        tok = onevision_tokenizer(y.data.vocabulary())
        cfg = onevision_config(tok, image_size=y.data.SIZE, **y.onevision_arch)
        return tok, LlavaOnevisionForConditionalGeneration(cfg).to(device)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        from lab.tiny_qwen import qwen2_5_vl_config, qwen_tokenizer

        tok = qwen_tokenizer(y.data.vocabulary())
        return tok, Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tok, **y.qwen_arch)).to(device)
    tok = word_tokenizer(y.data.vocabulary())
    cfg = video_llava_config(tok, image_size=y.data.SIZE, patch_size=y.data.PATCH, num_frames=y.data.FRAMES, **y.arch)
    return tok, VideoLlavaForConditionalGeneration(cfg).to(device)


def encoder(y: Yardstick, model, tok) -> Encoder:
    """Prompts, answers and pixels for ``model``: VideoLLaVA's, or another family's own (``FamilyEncoder``)."""
    if model.config.model_type == "video_llava":
        return Encoder(tok, model.config.video_seq_length)
    from vidsparse.models.families import family_for

    fam = family_for(model.config.model_type, "the model in training")
    mean, std = fam.default_pixel_stats()
    return FamilyEncoder(fam(model, tok, "training", mean, std, video_processor(y, model)), y)


def video_processor(y: Yardstick, model) -> dict | None:
    """The video processor settings the checkpoint ships (Qwen2.5-VL's pixel bounds a frame), else None."""
    if model.config.model_type != "qwen2_5_vl":
        return None
    low, high = y.qwen_pixels
    return {"size": {"shortest_edge": low, "longest_edge": high}}


def video_tower(model):
    """The tower that encodes the video frames: VideoLLaVA's video tower, OneVision's SigLIP, Qwen's ViT."""
    kind = model.config.model_type
    return {"video_llava": lambda: model.model.video_tower, "qwen2_5_vl": lambda: model.model.visual}.get(
        kind, lambda: model.model.vision_tower)()


class Checkpointer:
    """The resumable training state: saved every ``every_s`` seconds (and at stage ends), atomically,
    so that a run killed at any moment continues with ``--resume`` from its last save."""

    def __init__(self, path: Path, every_s: float, state: dict | None = None):
        self.path, self.every_s, self.state = path, every_s, state
        self.last = time.time()
        self.t0 = time.time() - (state["seconds"] if state is not None else 0.0)  # the run's start, resumes included
        self.common: dict = {}  # saved with every state (resume count, tower metrics)

    def resumes(self, stage: str) -> dict | None:
        """The saved state if it was saved during ``stage``."""
        return self.state if self.state is not None and self.state["stage"] == stage else None

    def save(self, stage: str, step: int, model, opt, rng: np.random.Generator, force: bool = False, **extra) -> None:
        if not force and time.time() - self.last < self.every_s:
            return
        state = {
            "stage": stage,
            "step": step,
            "model": model.state_dict(),
            "opt": opt.state_dict() if opt is not None else None,
            "rng": rng.bit_generator.state if rng is not None else None,
            "torch_rng": torch.get_rng_state(),
            "seconds": time.time() - self.t0,
            **self.common,
            **extra,
        }
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.last = time.time()

    @staticmethod
    def restore(state: dict, model, opt, rng: np.random.Generator | None) -> int:
        model.load_state_dict(state["model"])
        if opt is not None:
            opt.load_state_dict(state["opt"])
        if rng is not None:
            rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        return state["step"]


# ---------------------------------------------------------------- stage 1: dense tower pretraining
class PatchHeads(nn.Module):
    """Per-patch colour, shape and object centre of each of the ``frames`` frames a patch token covers
    (Qwen2.5-VL's patches span two frames): outputs (..., frames, classes)."""

    def __init__(self, hidden: int, frames: int = 1):
        super().__init__()
        self.frames = frames
        self.norm = nn.LayerNorm(hidden)
        self.color = nn.Linear(hidden, frames * N_PATCH_CLASSES["color"])
        self.shape = nn.Linear(hidden, frames * N_PATCH_CLASSES["shape"])
        self.center = nn.Linear(hidden, frames * 2)

    def forward(self, h):
        h = self.norm(h)
        return tuple(head(h).unflatten(-1, (self.frames, -1)) for head in (self.color, self.shape, self.center))


def frames_per_patch(model) -> int:
    """How many frames one patch of the video tower covers (Qwen2.5-VL's temporal patch; else 1)."""
    return getattr(model.config.vision_config, "temporal_patch_size", 1)


def units_to_raster(units: torch.Tensor) -> torch.Tensor:
    """(N, rows, cols, m, m, d) merge units, each its m x m patches row by row -> (N, rows*m * cols*m, d)
    patches in raster order, like ``shapes.Clip.patch_labels``."""
    n, rows, cols, m, _, d = units.shape
    return units.permute(0, 1, 3, 2, 4, 5).reshape(n, rows * m * cols * m, d)


def qwen_patch_states(visual, px: torch.Tensor) -> torch.Tensor:
    """The merger's input (the last ViT block's output) for ``px`` (clips, spans, rows, cols, m*m, patch_dim),
    as (clips * spans, patches, d) in raster order. The ViT runs the merge units window by window; HF puts
    its merger output back by argsort(window_index), and so does this (as ``qwen2_5_vl.video_features``)."""
    from transformers.vision_utils import get_vision_window_index

    clips, spans, rows, cols, units, _ = px.shape
    m = visual.spatial_merge_size
    grid = torch.tensor([[spans, rows * m, cols * m]] * clips)
    seen = {}

    def keep_merger_input(module, args) -> None:
        seen["states"] = args[0]

    hook = visual.merger.register_forward_pre_hook(keep_merger_input)
    try:
        visual(px.reshape(-1, px.shape[-1]), grid_thw=grid.to(px.device))
    finally:
        hook.remove()
    window_index, _ = get_vision_window_index(grid, m, visual.window_size, visual.patch_size)
    states = seen["states"].view(-1, units, seen["states"].shape[-1])[torch.argsort(window_index).to(px.device)]
    return units_to_raster(states.view(clips * spans, rows, cols, m, m, -1))


def patch_states(model, px: torch.Tensor) -> torch.Tensor:
    """Every patch token's state where the heads read it, (clips * time steps, patches, d) in raster order:
    the feature layer the projector reads (VideoLLaVA's CLS left out), or Qwen's merger input."""
    kind = model.config.model_type
    if kind == "qwen2_5_vl":
        return qwen_patch_states(model.model.visual, px)
    feats = video_tower(model)(px.flatten(0, 1), output_hidden_states=True).hidden_states
    return feats[model.config.vision_feature_layer][:, 1 if kind == "video_llava" else 0 :]


def tower_batch(y: Yardstick, rng: np.random.Generator, size: int, device, enc: Encoder | None = None):
    clips = [y.tower_clip(rng) for _ in range(size)]
    labels = [c.patch_labels() if enc is None or enc.patch is None else c.patch_labels(patch=enc.patch)
              for c in clips]
    frames = 1 if enc is None else enc.frames_per_patch

    def per_patch(values: list[np.ndarray]) -> torch.Tensor:  # (clips*frames, P, ..) -> (clips*steps, P, frames, ..)
        v = torch.from_numpy(np.concatenate(values))
        return v.unflatten(0, (-1, frames)).transpose(1, 2).to(device)

    lab = {k: per_patch([lab[k] for lab in labels]) for k in labels[0]}
    px = pixels(y, clips) if enc is None else enc.pixels(y, clips)
    return px.to(device), lab


def tower_losses(y: Yardstick, model, heads, px, lab):
    col, shp, cen = heads(patch_states(model, px))  # patch tokens only; a CLS is left unsupervised
    has = lab["has"]
    loss_col = F.cross_entropy(col.reshape(-1, col.shape[-1]), lab["color"].flatten())
    loss_shp = F.cross_entropy(shp.reshape(-1, shp.shape[-1]), lab["shape"].flatten())
    loss_cen = ((cen - lab["center"]) ** 2).sum(-1)[has].mean()
    with torch.no_grad():
        metrics = {
            "color": (col.argmax(-1) == lab["color"])[has].float().mean().item(),
            "shape": (shp.argmax(-1) == lab["shape"])[has].float().mean().item(),
            "background": (col.argmax(-1) == 0)[~has].float().mean().item(),
            "center_px": ((cen - lab["center"]).abs()[has].mean() * y.data.SIZE / 2).item(),
        }
    return loss_col + loss_shp + 2 * loss_cen, metrics


def cosine(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))


def train_tower(
    y: Yardstick, model, steps: int, batch: int, lr: float, device, seed: int, ckpt: Checkpointer | None = None,
    enc: Encoder | None = None,
) -> dict:
    tower = video_tower(model)
    heads = PatchHeads(tower.config.hidden_size, frames_per_patch(model)).to(device)
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 1])
    start = 0
    if ckpt is not None and (state := ckpt.resumes("tower")):
        start = Checkpointer.restore(state, model, opt, rng)
        heads.load_state_dict(state["heads"])
        log(f"resumed the tower stage at step {start}")
    tower.train()
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr * cosine(step, steps, 30)
        px, lab = tower_batch(y, rng, batch, device, enc)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=y.bf16):
            loss, m = tower_losses(y, model, heads, px, lab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            log(
                f"tower step {step + 1}/{steps} loss {loss.item():.3f} {fmt(m)} "
                f"{(time.time() - t0) / (step + 1 - start):.2f}s/step"
            )
        if ckpt is not None:
            ckpt.save("tower", step + 1, model, opt, rng, heads=heads.state_dict())
    tower.eval()
    with torch.no_grad():
        _, m = tower_losses(y, model, heads,
                            *tower_batch(y, np.random.default_rng([y.monitor_seed, 1]), 100, device, enc))
    log(f"tower held-out ({100 * y.data.FRAMES} frames): {fmt(m)}")
    return {k: round(v, 4) for k, v in m.items()}


def fmt(m: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in m.items())


# ---------------------------------------------------------------- stage 2: question answering
def qa_batch(y: Yardstick, enc: Encoder, rng: np.random.Generator, size: int, max_objects: int, device):
    """A batch for the model's forward, and the auxiliary losses' targets (``pointer_loss``,
    ``temporal_facts``)."""
    names, probs = list(y.qa_tasks), np.array(list(y.qa_tasks.values()))
    clips, ids, labels, asked = [], [], [], []
    for _ in range(size):
        qtype = names[rng.choice(len(names), p=probs / probs.sum())]
        clip, q, a = y.qa_clip(rng, qtype, max_objects)
        p, ans = enc.prompt(q), enc.answer(a)
        clips.append(clip)
        ids.append(p + ans)
        labels.append([-100] * len(p) + ans)
        word = asked_word(qtype, q)
        at = len(p) - 1 - p[::-1].index(enc.tok.convert_tokens_to_ids(word)) if word is not None else -1
        if y.early_answer and word is not None:
            labels[-1][at + 1] = ans[0]  # labels are shifted: the word's position predicts label at + 1
        k = asked_object(clip, qtype, word)
        if qtype in y.answer_pointer_types:
            k = answer_object(clip, a)
        asked.append((len(p) - 1, k, at))
    length = max(map(len, ids))
    inp = torch.full((size, length), enc.tok.pad_token_id)
    lab = torch.full((size, length), -100)
    att = torch.zeros(size, length, dtype=torch.long)
    for b, (seq, target) in enumerate(zip(ids, labels, strict=True)):
        inp[b, : len(seq)], lab[b, : len(seq)], att[b, : len(seq)] = torch.tensor(seq), torch.tensor(target), 1
    batch = {
        "input_ids": inp.to(device),
        "attention_mask": att.to(device),
        "labels": lab.to(device),
    }
    batch |= {k: v.to(device) for k, v in enc.video_inputs(enc.pixels(y, clips), inp).items()}
    if not y.padding_mask:
        del batch["attention_mask"]
    visual = inp == enc.video_id
    target = torch.zeros_like(visual)
    word = torch.zeros_like(visual)
    for b, (clip, (_, k, at)) in enumerate(zip(clips, asked, strict=True)):
        if k is not None and enc.pointer_targets:
            target[b, visual[b]] = torch.from_numpy(object_tokens(clip.ids, k, y.data.PATCH))
        if at >= 0:
            word[b, at] = True
    query_index = torch.tensor([last if k is not None else -1 for last, k, _ in asked])
    pointer = {"query_index": query_index.to(device), "visual": visual.to(device), "target": target.to(device),
               "word": word.to(device)}
    if y.facts_weight:
        pointer["facts"] = fact_targets(clips, y.data)
    return batch, pointer


def train_qa(y: Yardstick, model, tok, out: Path, args, device, ckpt: Checkpointer | None = None) -> list[dict]:
    enc = encoder(y, model, tok)
    if model.config.model_type == "video_llava":
        for p in model.model.image_tower.parameters():
            p.requires_grad_(False)
    tower = list(video_tower(model).parameters())
    if not y.tower_in_qa:
        for p in tower:
            p.requires_grad_(False)
    own_rate = y.projector_lr_scale != 1.0

    def in_rest(name: str) -> bool:
        return not any(k in name for k in ("video_tower", "image_tower", "vision_tower", "model.visual.")) and not (
            own_rate and "multi_modal_projector" in name)

    rest = [p for n, p in model.named_parameters() if in_rest(n)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.05, "base": args.lr},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "base": args.lr},
    ]
    if own_rate:
        groups.append({"params": list(model.model.multi_modal_projector.parameters()), "weight_decay": 0.0,
                       "base": args.lr * y.projector_lr_scale})
    if y.tower_in_qa:
        # A tower pretrained in the tower stage is fine-tuned at a tenth of the rate; one that was not
        # (Qwen2.5-VL's) learns at the full rate.
        rate = args.lr / 10 if args.tower_steps else args.lr
        groups.append({"params": tower, "weight_decay": 0.01, "base": rate, "tower": True})
    aux = AuxLosses(model, y)
    facts = TemporalFacts(model, y.data.FRAMES, y.data.MAX_OBJECTS) if y.facts_weight else None
    phase_start = round(y.temporal_from * args.qa_steps) if y.temporal_from is not None else args.qa_steps
    temporal = dataclasses.replace(y, qa_tasks=y.temporal_tasks) if y.temporal_from is not None else y
    starts = np.cumsum([args.qa_steps, *(c.steps for c in y.cycles)])  # where each cycle starts; the end
    n_steps = int(starts[-1])
    cycle_mix = [dataclasses.replace(y, qa_tasks=c.tasks, qa_clip=c.draw or y.qa_clip) for c in y.cycles]
    cycle_facts = [TemporalFacts(model, y.data.FRAMES, y.data.MAX_OBJECTS, c.facts) if y.facts_weight else None
                   for c in y.cycles]
    last_head = model.config.text_config.num_attention_heads - 1
    frame_pointers = [[FramePointer(model, layer, last_head) for layer in c.frame_pointer_layers] for c in y.cycles]
    dropout = KeyDropout(model) if any(c.key_dropout for c in y.cycles) else None
    per_frame = y.data.GRID**2 + 1
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    sets = quick_eval_sets(y, enc, args.monitor_n)
    rng = np.random.default_rng([args.train_seed, 2])
    history, ema, aux_ema, frame_ema, start, t0 = [], None, None, None, 0, time.time()
    if ckpt is not None and (state := ckpt.resumes("qa")):
        start = Checkpointer.restore(state, model, opt, rng)
        history, ema, t0 = state["history"], state["ema"], time.time() - state["qa_seconds"]
        aux_ema, frame_ema = state["aux_ema"], state.get("frame_ema")
        saved_parts = [state.get("facts"), *state.get("cycle_facts", [])]
        for part, saved in zip([facts, *cycle_facts], saved_parts, strict=False):  # heads not yet made: fresh
            if part is not None and saved is not None:
                part.load_state_dict(saved)
        log(f"resumed the QA stage at step {start}")
    model.train()
    for step in range(start, n_steps):
        c = int(np.searchsorted(starts, step, side="right")) - 1  # the cycle this step is in; -1: none
        if c >= 0:
            f = y.cycles[c].lr * cosine(step - int(starts[c]), y.cycles[c].steps, 60)
        else:
            f = cosine(step, args.qa_steps, 60)
        for g in opt.param_groups:
            g["lr"] = g["base"] * f * (0.0 if g.get("tower") and step < args.tower_freeze else 1.0)
        max_objects = y.curriculum_objects if step < 0.2 * args.qa_steps else y.data.MAX_OBJECTS
        in_phase = step >= phase_start
        tasks = cycle_mix[c] if c >= 0 else temporal if in_phase else y
        batch, targets = qa_batch(tasks, enc, rng, args.batch, max_objects, device)
        active = cycle_facts[c] if c >= 0 else facts if in_phase else None
        pointers = frame_pointers[c] if c >= 0 else []
        if dropout is not None and c >= 0 and y.cycles[c].key_dropout:
            dropout.set(*draw_drops(targets["visual"], rng, y.cycles[c].key_dropout, y.cycles[c].min_keep,
                                    y.cycles[c].later_keep))
        fade = max(0.0, 1 - step / (y.pointer_until * args.qa_steps))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=y.bf16):
            loss = model(**batch).loss
            extra_loss = aux(targets) if aux.active else None
            facts_loss = active(targets["visual"], targets["facts"]) if active is not None else None
            frame_loss = torch.stack([fp(targets["visual"], per_frame) for fp in pointers]).mean() if pointers else None
        total = loss + fade * extra_loss if extra_loss is not None and fade > 0 else loss
        total = total + y.facts_weight * facts_loss if facts_loss is not None else total
        (total + y.cycles[c].frame_pointer_weight * frame_loss if frame_loss is not None else total).backward()
        if dropout is not None:
            dropout.set(None)  # monitoring and saving see the whole model
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if facts_loss is not None:
            active.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if extra_loss is not None:
            aux_ema = extra_loss.item() if aux_ema is None else 0.95 * aux_ema + 0.05 * extra_loss.item()
        if frame_loss is not None:
            frame_ema = frame_loss.item() if frame_ema is None else 0.95 * frame_ema + 0.05 * frame_loss.item()
        if (step + 1) % 25 == 0:
            log(
                f"qa step {step + 1}/{n_steps} loss {ema:.3f} lr {f * args.lr:.2e} "
                + (f"aux {aux_ema:.3f} (x {fade:.3f}) " if aux_ema is not None else "")
                + ("facts " + " ".join(f"{k} {v:.2f}" for k, v in active.accuracy.items()) + " "
                   if active is not None and active.accuracy else "")
                + (f"frame pointer {frame_ema:.2f} " if pointers else "")
                + f"{(time.time() - t0) / (step + 1):.2f}s/step"
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == n_steps:
            acc = quick_eval(model, sets, device, enc)
            history.append(dict(step=step + 1, minutes=round((time.time() - t0) / 60, 1), loss=round(ema, 3), **acc))
            log(f"monitor {history[-1]}")
            save(y, model, tok, out)
        if ckpt is not None:
            extra = {"history": history, "ema": ema, "aux_ema": aux_ema, "qa_seconds": time.time() - t0,
                     "facts": facts.state_dict() if facts is not None else None,
                     "cycle_facts": [part.state_dict() if part is not None else None for part in cycle_facts],
                     "frame_ema": frame_ema}
            ckpt.save("qa", step + 1, model, opt, rng, force=step + 1 == n_steps, **extra)
    aux.close()
    for part in [facts, *cycle_facts, *sum(frame_pointers, []), dropout]:
        if part is not None:
            part.close()
    return history


def save(y: Yardstick, model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if model.config.model_type == "llava_onevision":  # the processor's statistics, as llava-hf ships them
        from transformers import LlavaOnevisionImageProcessorPil

        from lab.tiny_onevision import PIXEL_MEAN, PIXEL_STD

        size = model.config.vision_config.image_size
        LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_mean=list(PIXEL_MEAN),
                                        image_std=list(PIXEL_STD)).save_pretrained(out)
    if model.config.model_type == "qwen2_5_vl":  # the bounds it was trained with, where Qwen's processors read them
        from vidsparse.models.family import VIDEO_PROCESSOR_FILE

        (out / VIDEO_PROCESSOR_FILE).write_text(json.dumps(video_processor(y, model), indent=1) + "\n")


def load_trained(y: Yardstick, path: Path, device: torch.device):
    """A trained checkpoint to train further (``--init``)."""
    from transformers import VideoLlavaForConditionalGeneration

    tok = word_tokenizer(y.data.vocabulary())
    return tok, VideoLlavaForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).to(device)


def continued(earlier: dict, later: dict) -> dict:
    """EVAL.json's ``training`` of a run that continued ``earlier``'s checkpoint: both commands, the
    minutes added, the new cycles after the old ones, and the monitoring history on one step axis."""
    done = earlier["qa_steps"] + sum(earlier["cycle_steps"])
    return {
        **earlier,
        "command": f"{earlier['command']}, then {later['command']}",
        "minutes": round(earlier["minutes"] + later["minutes"], 1),
        "cycle_steps": [*earlier["cycle_steps"], later["qa_steps"] + sum(later["cycle_steps"])],
        "resumed": earlier["resumed"] + later["resumed"],
        "history": [*earlier["history"], *({**h, "step": done + h["step"],
                                            "minutes": round(earlier["minutes"] + h["minutes"], 1)}
                                           for h in later["history"])],
    }


# ---------------------------------------------------------------- the whole run
def train(y: Yardstick, args, argv: list[str], device, ckpt: Checkpointer) -> dict:
    """Both stages (or what is left of them after a resume); returns EVAL.json's ``training``."""
    state = ckpt.state
    if state is not None and state["stage"] == "done":
        log("training had finished; evaluating")
        return state["training"]
    ckpt.common["resumed"] = state["resumed"] + 1 if state is not None else 0
    torch.manual_seed(0)
    tok, model = build(y, device, args.family) if args.init is None else load_trained(y, args.init, device)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tok)}")
    earlier = json.loads((args.init / "EVAL.json").read_text())["training"] if args.init is not None else None
    if earlier is not None:
        tower_metrics = earlier["tower_metrics"]
    elif state is not None and state["stage"] == "qa":
        tower_metrics = state["tower_metrics"]
    elif args.tower_steps == 0:
        tower_metrics = {}  # no tower stage: the tower learns in the QA stage only
    else:
        enc = encoder(y, model, tok) if args.family != "video_llava" else None  # (None: VideoLLaVA's own path)
        tower_metrics = train_tower(y, model, args.tower_steps, args.tower_batch, args.tower_lr, device,
                                    args.train_seed, ckpt, enc)
    ckpt.common["tower_metrics"] = tower_metrics
    history = train_qa(y, model, tok, args.out, args, device, ckpt)
    # The image tower is never trained (videos only); give it the video tower's weights so
    # that image input is at least not noise.
    if args.family == "video_llava":
        model.model.image_tower.load_state_dict(model.model.video_tower.state_dict())
    save(y, model, tok, args.out)
    training = {
        "command": " ".join(["python -m lab.train_demo", *(a for a in argv if a != "--resume")]),
        "minutes": round((time.time() - ckpt.t0) / 60, 1),
        "device": str(device),
        "threads": args.threads,
        "tower_steps": args.tower_steps,
        "qa_steps": args.qa_steps,
        "cycle_steps": [c.steps for c in y.cycles],
        "batch": args.batch,
        "tower_in_qa": y.tower_in_qa,
        "bf16": y.bf16,
        "resumed": ckpt.common["resumed"],
        "tower_metrics": tower_metrics,
        "history": history,
    }
    if args.family != "video_llava":
        training["family"] = args.family
    if earlier is not None:
        training = continued(earlier, training)
    ckpt.save("done", args.qa_steps + sum(c.steps for c in y.cycles), model, None, None, force=True, training=training)
    log(f"trained in {training['minutes']} min")
    return training


def parse_args(argv: list[str]) -> tuple[Yardstick, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--yardstick", choices=sorted(YARDSTICKS), default="demo", help="ShapesQA (demo) or ShapesQA-HD")
    ap.add_argument("--family", choices=FAMILY_NAMES, default="video_llava",
                    help="the model family to train (llava_onevision: the yardstick's onevision_arch)")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: the yardstick's)")
    for name, kind in [
        ("tower-steps", int),
        ("tower-batch", int),
        ("tower-lr", float),
        ("qa-steps", int),
        ("batch", int),
        ("lr", float),
        ("tower-freeze", int),
        ("eval-every", int),
        ("monitor-n", int),
        ("eval-n", int),
    ]:
        ap.add_argument(f"--{name}", type=kind, default=None, help="default: the yardstick's")
    ap.add_argument("--cycles", type=int, default=None,
                    help="train only the first N of the yardstick's further cycles (default: all)")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue this trained checkpoint (no tower stage) instead of a new model; with --from-cycle")
    ap.add_argument("--from-cycle", type=int, default=None,
                    help="with --init: train only the yardstick's cycles from this one (0 = the first further cycle)")
    ap.add_argument("--train-seed", type=int, default=TRAIN_SEED,
                    help="seed of the training draws (a continuation may want draws the earlier run never saw)")
    ap.add_argument("--eval-seed", type=int, default=None, help="held-out seed (default: the yardstick's)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --out, no training")
    ap.add_argument("--eval-data", type=Path, default=None, help="keep the held-out mp4 set here (default: a temp dir)")
    ap.add_argument("--resume", action="store_true", help=f"continue from <out>/{STATE_FILE} if it exists")
    ap.add_argument("--save-minutes", type=float, default=5.0, help="how often the training state is saved")
    ap.add_argument("--decode-backend", default="auto", choices=["auto", "decord", "pyav"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    y = YARDSTICKS[args.yardstick]
    if args.cycles is not None:
        if not 0 <= args.cycles <= len(y.cycles):
            ap.error(f"--cycles must be 0..{len(y.cycles)} for the {y.name} yardstick")
        y = dataclasses.replace(y, cycles=y.cycles[: args.cycles])
    if (args.init is None) != (args.from_cycle is None):
        ap.error("--init and --from-cycle go together")
    if args.from_cycle is not None:
        if not 0 <= args.from_cycle < len(y.cycles):
            ap.error(f"--from-cycle must be 0..{len(y.cycles) - 1} for the {y.name} yardstick")
        if not (args.init / "EVAL.json").exists():
            ap.error(f"--init {args.init}: no EVAL.json there (a checkpoint this module trained)")
        y = dataclasses.replace(y, cycles=y.cycles[args.from_cycle:])
    if args.family != "video_llava":
        arch, out = (getattr(y, name) for name in FAMILY_FIELDS[args.family])
        if not arch:
            ap.error(f"the {y.name} yardstick has no {args.family} architecture")
        if args.init is not None or y.cycles:
            ap.error(f"--family {args.family} trains the tower and QA stages only (no --init, no cycles)")
        if args.out is None:
            args.out = Path(out)
    for key, value in {**y.defaults, "eval_seed": y.eval_seed}.items():
        if getattr(args, key) is None:
            setattr(args, key, Path(value) if key == "out" else value)
    return y, args


def autocast_here(y: Yardstick, device: torch.device) -> Yardstick:
    """The yardstick with its bf16 autocast only where bfloat16 is the faster dtype on ``device``: on a
    CPU without native bf16 the recipe's autocast would run >100x slower, so it trains in float32
    there (the same recipe, not bit for bit the weights of a bf16 run)."""
    if not y.bf16:
        return y
    dtype, why = fastest_dtype(device)
    log(f"bf16 autocast {'on' if dtype == 'bfloat16' else 'off'} ({why})")
    return y if dtype == "bfloat16" else dataclasses.replace(y, bf16=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    y, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {}
    if (args.out / "EVAL.json").exists():
        report = json.loads((args.out / "EVAL.json").read_text())
    state_path = args.out / STATE_FILE
    if not args.eval_only:
        y = autocast_here(y, device)
        state = torch.load(state_path, weights_only=False) if args.resume and state_path.exists() else None
        ckpt = Checkpointer(state_path, args.save_minutes * 60, state)
        report["training"] = train(y, args, argv, device, ckpt)
    if args.family != "video_llava":
        report["evaluation"] = evaluate_family(
            y, args.out, args.eval_n, args.eval_seed, device, args.eval_data, args.decode_backend
        )
    else:
        diff = sanity_check_masking(y, args.out, device)
        log(f"manual layer loop vs model forward: max |logit diff| {diff:.2e}")
        report["evaluation"] = evaluate(
            y, args.out, args.eval_n, args.eval_seed, device, args.eval_data, args.decode_backend
        )
        report["evaluation"]["manual_loop_max_logit_diff"] = diff
    titles = {"llava_onevision": "LLaVA-OneVision", "qwen2_5_vl": "Qwen2.5-VL"}
    titled = y if args.family == "video_llava" else dataclasses.replace(y, title=f"{y.title} ({titles[args.family]})")
    write_report(titled, args.out, report)
    state_path.unlink(missing_ok=True)
    for qtype, r in report["evaluation"]["results"].items():
        blind = f"  no-visual-after-L1 {r['no_visual_after_layer1']:.3f}" if "no_visual_after_layer1" in r else ""
        log(f"{qtype:8s} acc {r['accuracy']:.3f}{blind}  chance {r['chance']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
