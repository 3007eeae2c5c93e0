"""The two ShapesQA yardsticks the demo models are trained and evaluated on.

A yardstick bundles what differs between them -- the data generator, the architecture, the
training task mix, the seeds and the default step counts -- so that one trainer
(``lab.train_demo``) and one evaluation (``vidsparse.eval_demo``) serve both:

- ``demo``: ShapesQA, 32x32 frames, 8 x (16 + 1) = 136 visual tokens, a 4-layer decoder
  (``vidsparse/shipped/shapes-videollava``). Its entries reproduce the shipped checkpoint exactly.
- ``hd``: ShapesQA-HD, 64x64 frames, 8 x (64 + 1) = 520 visual tokens, still camera with still and
  moving objects that enter and leave, an 8-layer decoder (``vidsparse/shipped/shapes-hd-videollava``), so that
  pruning after an early layer leaves most of the depth to save.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from types import ModuleType

import numpy as np

from lab.temporal_facts import ORDER_FACTS
from vidsparse.datasets import shapes, shapes_hd

Draw = Callable[[np.random.Generator, str, int], tuple]  # (rng, question type, max objects) -> (clip, q, a)


@dataclass(frozen=True)
class Cycle:
    """A further training cycle after the QA steps: the learning rate warmed up again (60 steps) to
    ``lr`` x --lr and decayed over its own cosine, its own task mix, fresh heads for its temporal
    facts (weight: the yardstick's ``facts_weight``), the previous-frame attention loss
    (``pointer_loss.FramePointer``, on the last head of each layer listed) with its weight, its
    own training clips (``draw``; None: the yardstick's ``qa_clip``), and random visual-key dropout
    (``key_dropout``: the share of samples that lose a random U(``min_keep``, 1) of their visual
    tokens, ``lab.key_dropout``; ``later_keep``: (lo, hi) share of the clip every hit sample keeps
    from layer 2 on, None: half of them keep a random share of at least ``min_keep``)."""

    steps: int
    lr: float
    tasks: dict[str, float]
    facts: tuple[str, ...]
    frame_pointer_layers: tuple[int, ...] = ()
    frame_pointer_weight: float = 0.0
    draw: Draw | None = None
    key_dropout: float = 0.0
    min_keep: float = 0.1
    later_keep: tuple[float, float] | None = None


@dataclass(frozen=True)
class Yardstick:
    name: str
    title: str  # heading of EVAL.md
    data: ModuleType  # the generator: SIZE, PATCH, FRAMES, QUESTION_TYPES, TEMPORAL_TYPES, CHANCE, vocabulary()...
    make: Callable  # make_shapes(out_dir, n, seed, progress) of the held-out set
    arch: dict  # video_llava_config keywords
    qa_tasks: dict[str, float]  # question type (and auxiliary task) -> share of the QA batches
    eval_seed: int  # the held-out mp4 set of EVAL.md; never drawn by training or monitoring
    monitor_seed: int  # in-memory clips for monitoring during training and the tower's held-out metrics
    tower_clip: Callable[[np.random.Generator], object]  # a clip for dense tower pretraining
    qa_clip: Draw  # a training clip with a question of the given type
    monitor_clip: Callable[[np.random.Generator, str], tuple]  # a monitoring clip with its question
    defaults: dict = field(default_factory=dict)  # train_demo option defaults
    tower_in_qa: bool = True  # fine-tune the video tower during QA (after --tower-freeze steps)
    # Pass the padding mask in training. Right padding under a causal mask changes no real position's
    # output, and without a mask SDPA takes its causal path (~15% faster at 520 visual tokens); the
    # first model was trained with the mask, kept to reproduce it bit for bit.
    padding_mask: bool = True
    bf16: bool = False  # bfloat16 autocast in training (float32 weights, float32 evaluation)
    curriculum_objects: int = 3  # at most this many objects in the first 20% of the QA steps
    # The projector's learning rate relative to --lr (its own group, no weight decay, when not 1). Its
    # input is the tower's raw last hidden state (norm ~50, no LayerNorm): at the full rate it grew
    # ~14x in 750 HD steps and mapped same-colour objects of different shapes together (a linear
    # shape probe fell from 0.999 to 0.75 on its output), so colour/shape questions stayed at chance.
    projector_lr_scale: float = 1.0
    # The auxiliary pointer loss (``lab.pointer_loss``) on colour/shape batches: its weight at
    # the start, faded linearly to 0 at ``pointer_until`` of the QA steps; the layer and head it trains.
    pointer_weight: float = 0.0
    pointer_until: float = 0.6
    pointer_layer: int = 2
    # Early answers: on colour/shape questions the asked word's position is also trained to predict
    # the answer's first token (a prompt position, so no other label is displaced). The lookup is then
    # one step from the word itself, and the answer position only has to copy it from a few tokens back.
    early_answer: bool = False
    copy_weight: float = 0.0  # the copy pointer (``pointer_loss``): answer position -> asked word; 0: none
    copy_layer: int = 4
    word_pointer_weight: float = 0.0  # the pointer loss from the asked word's position; 0: none
    word_pointer_layer: int = 0  # its layer (head 0)
    # Question types (answered with an object's colour: first, second, disappears) on which the pointer
    # loss at ``pointer_layer`` also targets the answer object's patches from the answer position.
    answer_pointer_types: frozenset[str] = frozenset()
    # The temporal phase, from ``temporal_from`` of the QA steps on (None: no such phase): the task mix
    # ``temporal_tasks`` and the per-token temporal-facts loss (``lab.temporal_facts``; weight
    # ``facts_weight`` times the mean over the facts, not faded).
    temporal_from: float | None = None
    temporal_tasks: dict[str, float] = field(default_factory=dict)
    facts_weight: float = 0.0
    cycles: tuple[Cycle, ...] = ()  # further training cycles after the QA steps, in order
    # The LLaVA-OneVision yardstick model (``train_demo --family llava_onevision``): onevision_config
    # keywords (image_size is the data set's) and its checkpoint folder; empty: no such model.
    onevision_arch: dict = field(default_factory=dict)
    onevision_out: str | None = None
    # The Qwen2.5-VL yardstick model (``--family qwen2_5_vl``): qwen2_5_vl_config keywords, its video
    # processor's pixel bounds a frame (min, max: saved as its video_preprocessor_config.json, so that
    # inference sizes frames as training did) and its checkpoint folder; empty: no such model.
    qwen_arch: dict = field(default_factory=dict)
    qwen_pixels: tuple[int, int] = (0, 0)
    qwen_out: str | None = None


# ------------------------------------------------------------------------------------- ShapesQA
def _demo_tower_clip(rng: np.random.Generator):
    styles = [False, True, "ordered"]
    return shapes.render_clip(rng, temporal=styles[rng.choice(3, p=[0.7, 0.15, 0.15])])


def _demo_qa_clip(rng: np.random.Generator, qtype: str, max_objects: int):
    clip = shapes.render_clip(
        rng,
        n_objects=int(rng.integers(shapes.MIN_OBJECTS, max_objects + 1)),
        temporal=shapes.CLIP_STYLE.get(qtype, False),
    )
    return (clip, *shapes.ask(clip, qtype, rng))


DEMO = Yardstick(
    name="demo",
    title="ShapesQA demo model",
    data=shapes,
    make=shapes.make_shapes,
    arch={
        "vision_hidden": 96,
        "vision_layers": 2,
        "vision_heads": 4,
        "text_hidden": 160,
        "text_layers": 4,
        "text_heads": 4,
        "vision_feature_layer": -1,
    },
    qa_tasks={
        "color": 0.2,
        "shape": 0.08,
        "count": 0.12,
        "first": 0.1,
        "second": 0.2,
        "describe": 0.1,
        "describe_shapes": 0.2,
    },
    eval_seed=424242,
    monitor_seed=424242,  # (the first model monitored on other streams of its eval seed; kept to reproduce it)
    tower_clip=_demo_tower_clip,
    qa_clip=_demo_qa_clip,
    monitor_clip=shapes.sample,
    # The DEMO architecture in OneVision's shape: SigLIP with patch 4 (an 8 x 8 grid a 32 px frame,
    # pooled to 4 x 4: 8 x 16 + 1 newline = 129 visual rows, like VideoLLaVA's 8 x 17 = 136), a 4-layer
    # Qwen2 decoder of width 160 with GQA (2 key/value heads, as the real checkpoints group them).
    onevision_arch={
        "patch_size": 4,
        "vision_hidden": 96,
        "vision_layers": 2,
        "vision_heads": 4,
        "text_hidden": 160,
        "text_layers": 4,
        "text_heads": 4,
        "kv_heads": 2,
        "vision_feature_layer": -1,
    },
    onevision_out="vidsparse/shipped/shapes-onevision",
    # The DEMO architecture in Qwen2.5-VL's shape: a ViT with patch 4 and 2 x 2 merging, with pixel bounds
    # that keep a 32 px frame at 32 px (8 x 8 patches -> 4 x 4 tokens a temporal patch of 2 frames: 4 x 16
    # = 64 visual tokens at 3-D positions), windows of 2 x 2 tokens with the last block attending fully,
    # and a 4-layer Qwen2 decoder of width 160 with GQA and M-RoPE (sections 4 + 8 + 8 = head_dim / 2).
    qwen_arch={
        "patch_size": 4,
        "window_size": 16,
        "vision_hidden": 96,
        "vision_layers": 2,
        "vision_heads": 4,
        "fullatt_block_indexes": (1,),
        "text_hidden": 160,
        "text_layers": 4,
        "text_heads": 4,
        "kv_heads": 2,
        "mrope_section": (4, 8, 8),
    },
    qwen_pixels=(32 * 32, 64 * 64),
    qwen_out="vidsparse/shipped/shapes-qwen",
    defaults={
        "out": "vidsparse/shipped/shapes-videollava",
        "tower_steps": 1500,
        "tower_batch": 24,
        "tower_lr": 2e-3,
        "qa_steps": 3000,
        "batch": 32,
        "lr": 1e-3,
        "tower_freeze": 300,
        "eval_every": 300,
        "monitor_n": 200,
        "eval_n": 500,
    },
)


# ------------------------------------------------------------------------------------- ShapesQA-HD
def _hd_qa_clip(rng: np.random.Generator, qtype: str, max_objects: int):
    return shapes_hd.sample(rng, qtype, max_objects)


_CYCLE_TASKS = {
    "color": 0.03,
    "shape": 0.03,
    "count": 0.08,
    "first": 0.08,
    "second": 0.10,
    "disappears": 0.22,
    "moving": 0.22,
    "describe_times": 0.12,
    "describe_motion": 0.12,
}
_CYCLE_FACTS = ("frame", "onset", "rank", "moving", "present", "vanished")
# Recipe N's cycle: motion and counts over the clip, with facts that only the look back answers.
_MOTION_TASKS = {
    "color": 0.03,
    "shape": 0.03,
    "count": 0.12,
    "first": 0.06,
    "second": 0.10,
    "disappears": 0.16,
    "moving": 0.24,
    "describe_times": 0.08,
    "describe_motion": 0.18,
}
_MOTION_FACTS = ("frame", "onset", "rank", "present", "vanished", "changed", "moved", "seen")
# Recipe O's cycle: the order of events over the clip (second, disappears: N's weakest types) with
# motion and counts, half the samples with random visual tokens dropped.
_ROBUST_TASKS = {
    "color": 0.05,
    "shape": 0.05,
    "count": 0.12,
    "first": 0.08,
    "second": 0.18,
    "disappears": 0.18,
    "moving": 0.16,
    "describe_times": 0.10,
    "describe_motion": 0.08,
}
# Recipe P's cycle: the order of events (second, disappears) again, with facts that hold each frame's
# answer so far (``temporal_facts.ORDER_FACTS``).
_ORDER_TASKS = {
    "color": 0.04,
    "shape": 0.04,
    "count": 0.08,
    "first": 0.08,
    "second": 0.28,
    "disappears": 0.22,
    "moving": 0.10,
    "describe_times": 0.12,
    "describe_motion": 0.04,
}
MOTION_P_WINDOW = 0.2  # recipe N's chance that a still object is put down or taken away, in motion questions
MOTION_QUESTIONS = frozenset({"moving", "describe_motion"})  # the questions answered from motion


def _hd_motion_clip(rng: np.random.Generator, qtype: str, max_objects: int):
    """Recipe N's training clips. In the data set 30% of the still objects and 94% of the moving ones
    stay in view all clip long, so "in view all clip long" says "moves"; M's model learnt exactly
    that. For the motion questions 79% of the still objects stay in view here: in view all clip long
    says nothing, only the motion itself tells them apart. Other types as in the data set (first,
    second and disappears need objects that come and go)."""
    p_window = MOTION_P_WINDOW if qtype in MOTION_QUESTIONS else shapes_hd.P_WINDOW
    return shapes_hd.sample(rng, qtype, max_objects, p_window)


CLOSE_CALL_SHARE = 0.5  # recipe Q's share of order questions asked on a close call
R_CLOSE_CALL_SHARE = 0.8  # recipe R's (and recipe T's)


def close_call(clip, qtype: str, answer: str) -> bool:
    """Whether another object's onset (offset for ``disappears``) is one frame from the answer's."""
    t = shapes_hd.event_time(next(o for o in clip.objects if o.color == answer), qtype)
    return any(abs(shapes_hd.event_time(o, qtype) - t) == 1 for o in clip.objects if o.color != answer)


def _hd_close_call_clip(rng: np.random.Generator, qtype: str, max_objects: int, share: float = CLOSE_CALL_SHARE):
    """Recipe Q's training clips: recipe N's, but ``share`` of the order questions are asked on close
    calls. Recipe P's model answered `second` right 0.47 of the time where the next object appears
    one frame after the answer (11% of the questions) and 0.91 elsewhere (300 tuning clips): its
    errors are one-frame timing errors, which the natural mix shows too rarely to learn."""
    want_close = qtype in shapes_hd.TEMPORAL_TYPES and rng.random() < share
    while True:
        clip, question, answer = _hd_motion_clip(rng, qtype, max_objects)
        if not want_close or close_call(clip, qtype, answer):
            return clip, question, answer


BALANCED_MOVERS_SHARE = 0.5  # recipe T's share of motion questions asked with a uniform number of movers


def _hd_balanced_movers_clip(rng: np.random.Generator, qtype: str, max_objects: int,
                             share: float = BALANCED_MOVERS_SHARE):
    """Recipe T's training clips: recipe R's, but ``share`` of the motion questions (moving,
    describe_motion) on clips whose number of moving objects is uniform over 0..n (a clip with m of
    its n objects moving is kept with probability 1 / C(n, m)). Each object moves with probability
    1/2, so all four of four move in 1 clip of 16: recipe R answered `moving` right 0.69 of the
    time with three movers and 0.12 with four, against 0.91 with one or two (300 tuning clips),
    nearly always one too few."""
    if qtype in MOTION_QUESTIONS and rng.random() < share:
        while True:
            clip, question, answer = _hd_motion_clip(rng, qtype, max_objects)
            n, m = len(clip.objects), sum(o.moving for o in clip.objects)
            if rng.random() < 1 / math.comb(n, m):
                return clip, question, answer
    return _hd_close_call_clip(rng, qtype, max_objects, share=R_CLOSE_CALL_SHARE)


# Recipe T's cycle: R's mix with more motion questions (half on balanced clips), fewer descriptions.
_BALANCED_TASKS = {
    "color": 0.04,
    "shape": 0.04,
    "count": 0.08,
    "first": 0.08,
    "second": 0.24,
    "disappears": 0.22,
    "moving": 0.16,
    "describe_times": 0.10,
    "describe_motion": 0.04,
}

# Recipe U's cycle: T's with counts and motion weighted up (stprune at 10% kept 0.71 of T's `count`
# and 0.53 of its `moving` answers on the tuning clips, the two types furthest from full).
_PRUNED_TASKS = {
    "color": 0.04,
    "shape": 0.04,
    "count": 0.18,
    "first": 0.06,
    "second": 0.16,
    "disappears": 0.16,
    "moving": 0.22,
    "describe_times": 0.08,
    "describe_motion": 0.06,
}
PRUNED_LATER_KEEP = (0.05, 0.3)  # recipe U: the share of the clip kept from layer 2 on, in every hit sample

# Recipe P's cycle; recipe Q's is the same with close calls, recipe R's with more of them.
_ORDER_CYCLE = Cycle(steps=700, lr=0.2, tasks=_ORDER_TASKS, facts=(*_MOTION_FACTS, *ORDER_FACTS),
                     frame_pointer_layers=(0, 1), frame_pointer_weight=0.5, draw=_hd_motion_clip, key_dropout=0.5,
                     min_keep=0.1)

HD = Yardstick(
    name="hd",
    title="ShapesQA-HD demo model",
    data=shapes_hd,
    make=shapes_hd.make_shapes_hd,
    arch={
        "vision_hidden": 96,
        "vision_layers": 2,
        "vision_heads": 4,
        "text_hidden": 128,
        "text_layers": 8,
        "text_heads": 4,
        "vision_feature_layer": -1,
    },
    # Colour-shape binding (color, shape, describe, describe_shapes) gets ~55% of the batches: with
    # 520 visual tokens and objects on ~19% of them it is the hard part; the temporal descriptions,
    # which need colour only, had more than half of the loss tokens in the first recipe.
    qa_tasks={
        "color": 0.14,
        "shape": 0.20,
        "count": 0.03,
        "first": 0.05,
        "second": 0.09,
        "disappears": 0.09,
        "moving": 0.09,
        "describe": 0.08,
        "describe_shapes": 0.13,
        "describe_times": 0.06,
        "describe_motion": 0.04,
    },
    eval_seed=434343,
    monitor_seed=515151,
    tower_clip=shapes_hd.render_clip,
    qa_clip=_hd_qa_clip,
    monitor_clip=shapes_hd.sample,
    defaults={
        "out": "vidsparse/shipped/shapes-hd-videollava",
        "tower_steps": 2000,
        "tower_batch": 16,
        "tower_lr": 4e-3,
        "qa_steps": 3000,
        "batch": 24,
        "lr": 1e-3,
        "tower_freeze": 0,
        "eval_every": 250,
        "monitor_n": 60,
        "eval_n": 700,
    },
    tower_in_qa=False,
    padding_mask=False,
    bf16=True,
    projector_lr_scale=0.1,
    # Recipe J (pointer_loss.py says why): the asked word looks its object up at layer 0 (word
    # pointer) and answers there (early answers); the answer position copies it from the word (copy
    # pointer); the answer position's own pointer at layer 2. Shape questions get the largest share:
    # their readout learns only from them once the lookup exists.
    pointer_weight=0.2,
    early_answer=True,
    copy_weight=0.2,
    word_pointer_weight=1.0,
    # Recipe K: recipe J, then from QA step 1800 (where the pointer losses have faded out) the temporal
    # phase: mostly multi-frame questions and the temporal descriptions, with the temporal-facts loss
    # (J had learnt nothing about time by step 1750: temporal_facts.py has the measurements).
    temporal_from=0.6,
    temporal_tasks={
        "color": 0.03,
        "shape": 0.03,
        "count": 0.06,
        "first": 0.14,
        "second": 0.14,
        "disappears": 0.14,
        "moving": 0.14,
        "describe_times": 0.20,
        "describe_motion": 0.12,
    },
    facts_weight=2.5,
    # Recipe L: recipe K, then a second cycle of 1000 steps weighted towards "disappears" and "moving",
    # which K left near chance; its facts drop K's ``gone`` (it never beat answering "nothing gone")
    # and add each frame's colours shown and lost. Recipe M: L, then a third cycle of 1500 steps with
    # the previous-frame attention loss at layers 0 and 1 (L's heads for motion and the colours lost
    # stayed near their base rates: no head looked at the same place one frame back). Recipe N: M,
    # then a fourth cycle of 1000 steps for motion and counts; its facts drop ``moving`` (M's model
    # read it from how long an object stays in view) for a patch's change since the previous frame,
    # each frame's colours moved and the colours seen so far (``temporal_facts``), and its motion
    # questions are asked on clips where still objects stay in view as often as moving ones. Recipe O:
    # N, then a fifth cycle of 1000 steps in which half the samples lose a random 0-90% of their
    # visual tokens (before layer 0, and for half of those more after layer 1; ``key_dropout`` says
    # why), weighted towards the order of events (second, disappears). Recipe P: O, then a sixth cycle
    # of 700 steps for the order of events whose facts ask each frame's last token, after layer 3, for
    # the colour that appeared first and second and that disappeared first so far (O's model got
    # `second` wrong mostly when the next object appeared one frame later). Recipe Q: P, then P's cycle
    # again with half its order questions asked on close calls (P still got those wrong). Recipe R: Q,
    # then that cycle once more with 80% of its order questions on close calls (Q got `second` right
    # 0.59 of the time on close calls where the next object appears one frame later). Recipe T: R, then
    # that cycle for 600 steps with more motion questions, half of them on clips drawn so that every
    # number of moving objects is equally common (R answered `moving` 0.12 of the time with four movers).
    # Recipe U: T, then that cycle for 600 steps with counts and motion weighted up and drops shaped as a
    # pruned prefill: 60% of the samples keep a random 20-100% of their visual tokens through layers
    # 0-1 and a random 5-30% of the clip from layer 2 on (random tokens, no method's choice).
    cycles=(
        Cycle(steps=1000, lr=0.3, tasks=_CYCLE_TASKS, facts=_CYCLE_FACTS),
        Cycle(steps=1500, lr=0.3, tasks=_CYCLE_TASKS, facts=_CYCLE_FACTS, frame_pointer_layers=(0, 1),
              frame_pointer_weight=0.5),
        Cycle(steps=1000, lr=0.3, tasks=_MOTION_TASKS, facts=_MOTION_FACTS, frame_pointer_layers=(0, 1),
              frame_pointer_weight=0.5, draw=_hd_motion_clip),
        Cycle(steps=1000, lr=0.3, tasks=_ROBUST_TASKS, facts=_MOTION_FACTS, frame_pointer_layers=(0, 1),
              frame_pointer_weight=0.5, draw=_hd_motion_clip, key_dropout=0.5, min_keep=0.1),
        _ORDER_CYCLE,
        replace(_ORDER_CYCLE, draw=_hd_close_call_clip),
        replace(_ORDER_CYCLE, draw=partial(_hd_close_call_clip, share=R_CLOSE_CALL_SHARE)),
        replace(_ORDER_CYCLE, steps=600, tasks=_BALANCED_TASKS, draw=_hd_balanced_movers_clip),
        replace(_ORDER_CYCLE, steps=600, tasks=_PRUNED_TASKS, draw=_hd_balanced_movers_clip, key_dropout=0.6,
                min_keep=0.2, later_keep=PRUNED_LATER_KEEP),
    ),
)

YARDSTICKS = {y.name: y for y in (DEMO, HD)}
