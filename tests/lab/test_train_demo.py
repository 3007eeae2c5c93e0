"""The demo-model trainer: one trainer for both yardsticks, and a killed run that resumes from its saved
state ends with exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import train_demo
from lab.yardsticks import HD, YARDSTICKS

TINY = dataclasses.replace(
    HD,
    name="tiny",
    arch={
        "vision_hidden": 16,
        "vision_layers": 1,
        "vision_heads": 2,
        "text_hidden": 16,
        "text_layers": 4,  # the facts read residuals after layers 0, 1, 2 and 3
        "text_heads": 2,
        "vision_feature_layer": -1,
    },
    defaults={
        **HD.defaults,
        "tower_steps": 3,
        "tower_batch": 1,
        "qa_steps": 4,
        "batch": 2,
        "eval_every": 2,
        "monitor_n": 1,
    },
    pointer_layer=1,  # the auxiliary losses are trained (and resumed) too
    copy_weight=0.1,
    copy_layer=1,
    word_pointer_weight=0.1,
    early_answer=True,
    temporal_from=0.5,  # the temporal phase (its task mix and facts loss) from QA step 2 of 4
    # then nine cycles of 2 steps each (QA steps 5-6, 7-8, ..., 21-22), the last eight with the frame
    # pointer, the last six with visual-key dropout
    cycles=tuple(dataclasses.replace(c, steps=2) for c in HD.cycles),
)


def test_each_yardstick_has_its_defaults():
    y, args = train_demo.parse_args([])
    assert y is YARDSTICKS["demo"] and args.out == Path("vidsparse/shipped/shapes-videollava")
    assert (args.qa_steps, args.batch, args.eval_seed) == (3000, 32, 424242)
    y, args = train_demo.parse_args(["--yardstick", "hd", "--qa-steps", "7"])
    assert y is HD and args.out == Path("vidsparse/shipped/shapes-hd-videollava") and args.qa_steps == 7
    assert args.eval_seed == 434343 and HD.monitor_seed != HD.eval_seed
    assert HD.arch["text_layers"] >= 8
    assert set(HD.data.QUESTION_TYPES) <= set(HD.qa_tasks)
    y, _ = train_demo.parse_args(["--yardstick", "hd", "--cycles", "4"])  # recipe O
    assert y.cycles == HD.cycles[:4] and len(HD.cycles) == 9
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--yardstick", "hd", "--cycles", "10"])


class Killed(Exception):
    pass


def _run(tmp_path: Path, name: str, resume: bool, monkeypatch, kill: tuple[str, int] | None = None) -> dict:
    """train() on the tiny yardstick, saving the state at every step; ``kill=(function, n)`` raises
    on the n-th call of that batch function, like a process killed mid-run."""
    monkeypatch.setitem(train_demo.YARDSTICKS, "tiny", TINY)
    y, args = train_demo.parse_args(["--yardstick", "tiny", "--out", str(tmp_path / name), "--save-minutes", "0"])
    state_path = args.out / train_demo.STATE_FILE
    state = torch.load(state_path, weights_only=False) if resume else None
    if kill is not None:
        fn, n = kill
        original, calls = getattr(train_demo, fn), []

        def dies(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise Killed
            return original(*a, **k)

        monkeypatch.setattr(train_demo, fn, dies)
    try:
        train_demo.train(
            y, args, ["--yardstick", "tiny"], torch.device("cpu"), train_demo.Checkpointer(state_path, 0, state)
        )
    finally:
        monkeypatch.undo()
    return torch.load(state_path, weights_only=False)


# Where the run is killed, in order: the tower stage's 3rd batch; qa_batch's 3rd, and its 4th (inside the
# temporal phase, from QA step 2 of 4, after its heads have learnt); its 6th, 8th, 10th, 12th and 14th: inside
# each cycle, after its own heads (and the frame pointer) have learnt.
KILLS = [("tower_batch", 3), ("qa_batch", 3), ("qa_batch", 4), ("qa_batch", 6), ("qa_batch", 8), ("qa_batch", 10),
         ("qa_batch", 12), ("qa_batch", 14)]


def test_a_run_killed_in_every_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """One run killed at each point of KILLS in turn and resumed after each ends with the weights,
    history and tower metrics of a run that was never killed."""
    torch.set_num_threads(1)
    whole = _run(tmp_path, "whole", False, monkeypatch)
    assert whole["stage"] == "done" and whole["training"]["resumed"] == 0
    saved = None
    for stage, call in KILLS:
        # A resumed run's first batch of the saved stage is that stage's step saved["step"] + 1.
        done_before = saved["step"] if saved is not None and saved["stage"] == stage.split("_")[0] else 0
        with pytest.raises(Killed):
            _run(tmp_path, "killed", saved is not None, monkeypatch, kill=(stage, call - done_before))
        saved = torch.load(tmp_path / "killed" / train_demo.STATE_FILE, weights_only=False)
        assert (saved["stage"], saved["step"]) == (stage.split("_")[0], call - 1)
    done = _run(tmp_path, "killed", True, monkeypatch)
    assert done["training"]["resumed"] == len(KILLS)
    for key, value in whole["model"].items():
        assert torch.equal(value, done["model"][key]), key
    strip = [{k: v for k, v in h.items() if k != "minutes"} for h in whole["training"]["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "minutes"} for h in done["training"]["history"]]
    assert whole["training"]["tower_metrics"] == done["training"]["tower_metrics"]


def test_pointer_loss_is_the_share_of_eager_attention_on_the_asked_object():
    """The pointer loss recomputes one head's attention row from the captured layer input; HF's eager
    attention probabilities (output_attentions) give the same -log share of video attention on the
    asked object (pointer, from the answer position or from the asked word), and of all attention on
    the asked word (copy pointer)."""
    import numpy as np

    from lab.demo_eval import Encoder
    from lab.pointer_loss import PointerLoss

    torch.manual_seed(0)
    y = dataclasses.replace(TINY, arch={**TINY.arch, "text_layers": 3, "text_heads": 4}, pointer_layer=2)
    tok, model = train_demo.build(y, torch.device("cpu"))
    model.config._attn_implementation = "eager"
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    enc = Encoder(tok, model.config.video_seq_length)
    y = dataclasses.replace(y, qa_tasks={"color": 0.4, "shape": 0.3, "count": 0.3})
    batch, targets = train_demo.qa_batch(y, enc, np.random.default_rng(5), 8, 4, torch.device("cpu"))
    assert (targets["query_index"] >= 0).sum() >= 2 and (targets["query_index"] < 0).any()
    pointer = PointerLoss(model, y.pointer_layer, head=1)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        loss = pointer(targets["query_index"], targets["visual"], targets["target"])
        copy = pointer(targets["query_index"], torch.ones_like(targets["visual"]), targets["word"])
        word_index = torch.where(targets["query_index"] >= 0, targets["word"].int().argmax(-1), -1)
        from_word = pointer(word_index, targets["visual"], targets["target"])
    pointer.close()
    probs = out.attentions[y.pointer_layer][:, 1]  # (b, n, n), head 1
    expected, expected_copy, expected_from_word = [], [], []
    for b, last in enumerate(targets["query_index"].tolist()):
        if last < 0:
            continue
        row = probs[b, last]
        (word,) = targets["word"][b].nonzero().flatten().tolist()
        assert tok.convert_ids_to_tokens(int(batch["input_ids"][b, word])) in {*HD.data.COLORS, *HD.data.SHAPES}
        expected_copy.append(-torch.log(row[word]))
        at_word = probs[b, word]
        expected_from_word.append(-torch.log(at_word[targets["target"][b]].sum() / at_word[targets["visual"][b]].sum()))
        assert targets["target"][b].any() and not (targets["target"][b] & ~targets["visual"][b]).any()
        expected.append(-torch.log(row[targets["target"][b]].sum() / row[targets["visual"][b]].sum()))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(copy, torch.stack(expected_copy).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_word, torch.stack(expected_from_word).mean(), rtol=1e-4, atol=1e-5)



def test_frame_pointer_is_the_share_of_eager_attention_one_frame_back():
    """From every visual token of frames 1.., the -log share of the head's video attention (HF's
    eager probabilities) that falls on the same token one frame (65 tokens) earlier, averaged."""
    import numpy as np

    from lab.demo_eval import Encoder
    from lab.pointer_loss import FramePointer

    torch.manual_seed(0)
    y = dataclasses.replace(TINY, arch={**TINY.arch, "text_layers": 2, "text_heads": 4})
    tok, model = train_demo.build(y, torch.device("cpu"))
    for module in [model, *model.modules()]:
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    enc = Encoder(tok, model.config.video_seq_length)
    batch, targets = train_demo.qa_batch(y, enc, np.random.default_rng(2), 3, 4, torch.device("cpu"))
    per_frame = HD.data.GRID**2 + 1
    pointer = FramePointer(model, 1, head=3)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        loss = pointer(targets["visual"], per_frame)
    pointer.close()
    probs = out.attentions[1][:, 3]
    expected = []
    for b in range(len(probs)):
        video = targets["visual"][b].nonzero().flatten().tolist()
        assert len(video) == HD.data.FRAMES * per_frame
        for i in range(per_frame, len(video)):
            row = probs[b, video[i]]
            expected.append(-torch.log(row[video[i - per_frame]] / row[video].sum()))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)

def test_early_answer_labels_the_asked_word_with_the_answer():
    """With early answers, logits at the asked word's position (HF shifts labels by one) are trained on
    the answer's first token; every other prompt position stays unlabelled."""
    import numpy as np

    from lab.demo_eval import Encoder

    y = dataclasses.replace(TINY, qa_tasks={"color": 0.5, "shape": 0.3, "count": 0.2}, early_answer=True)
    tok, model = train_demo.build(y, torch.device("cpu"))
    enc = Encoder(tok, model.config.video_seq_length)
    batch, targets = train_demo.qa_batch(y, enc, np.random.default_rng(5), 8, 4, torch.device("cpu"))
    words = {tok.convert_tokens_to_ids(w): w for w in ("square", "circle", "triangle", "cross", *HD.data.COLORS)}
    checked = 0
    for b in range(8):
        ids, labels, last = batch["input_ids"][b], batch["labels"][b], int(targets["query_index"][b])
        if last < 0:  # not a colour/shape question: only the answer is labelled (one contiguous run)
            labelled = (labels != -100).nonzero().flatten().tolist()
            assert labelled == list(range(labelled[0], labelled[-1] + 1))
            continue
        prompt_labels = (labels[: last + 1] != -100).nonzero().flatten().tolist()
        (at,) = prompt_labels
        assert int(ids[at - 1]) in words and labels[at] == labels[last + 1]  # the word's position -> the answer
        checked += 1
    assert checked >= 2


def test_answer_pointer_targets_the_object_that_answers_a_temporal_question():
    """With answer_pointer_types, a temporal question's pointer target is every patch (>= 4 pixels)
    of the object drawn in the answer's colour, read from the renderer's id masks; it has no asked
    word, so the copy and word pointers skip it and the auxiliary loss stays finite."""
    import numpy as np

    from lab.demo_eval import Encoder
    from lab.pointer_loss import AuxLosses

    drawn = []

    def remember(rng, qtype, max_objects, draw=TINY.qa_clip):
        drawn.append(draw(rng, qtype, max_objects))
        return drawn[-1]

    y = dataclasses.replace(TINY, qa_tasks={"second": 0.4, "disappears": 0.3, "color": 0.3}, qa_clip=remember,
                            answer_pointer_types=frozenset({"second", "disappears"}), copy_weight=0.5,
                            word_pointer_weight=0.5, pointer_weight=0.5)
    tok, model = train_demo.build(y, torch.device("cpu"))
    enc = Encoder(tok, model.config.video_seq_length)
    batch, targets = train_demo.qa_batch(y, enc, np.random.default_rng(3), 8, 4, torch.device("cpu"))
    patch, grid = HD.data.PATCH, HD.data.SIZE // HD.data.PATCH
    temporal = 0
    for b, (clip, question, answer) in enumerate(drawn):
        if question.startswith("what color"):
            assert targets["word"][b].sum() == 1
            continue
        (k,) = [i for i, o in enumerate(clip.objects) if o.color == answer]
        pixels = (clip.ids == k).reshape(-1, grid, patch, grid, patch).sum((2, 4))  # (frames, grid, grid)
        expected = [[False] + (pixels[f].flatten() >= 4).tolist() for f in range(len(pixels))]  # CLS first
        visual = targets["visual"][b]
        assert targets["target"][b][visual].tolist() == sum(expected, [])
        assert targets["query_index"][b] >= 0 and not targets["word"][b].any()
        temporal += 1
    assert 0 < temporal < 8
    aux = AuxLosses(model, y)
    model(**batch)
    assert torch.isfinite(aux(targets))
    aux.close()


def test_each_part_of_the_qa_stage_trains_on_its_own_mix_and_schedule(tmp_path, monkeypatch):
    """QA steps 1-2 (TINY: 4 QA steps, temporal phase from step 2, then nine 2-step cycles) use the
    main mix, 3-4 the temporal mix, 5-22 the cycles', whose learning rate is warmed up again to their
    ``lr`` x --lr (cosine with 60 warm-up steps, written out here from the recipe); only the second to
    ninth cycles add the frame pointer, only the third to ninth draw their own clips, only the fourth
    to ninth drop visual keys (set before their forwards, unset after each), and only the ninth keeps
    a low share of the clip from layer 2 on."""
    import math

    mixes, draws, rates, framed, drops = [], [], [], [], []
    real_batch, real_step = train_demo.qa_batch, torch.optim.AdamW.step
    real_pointer = train_demo.FramePointer.__call__
    real_set, real_draw = train_demo.KeyDropout.set, train_demo.draw_drops
    later_keeps = []

    def draw_drops(visual, rng, share, min_keep, later_keep=None):
        later_keeps.append(later_keep)
        return real_draw(visual, rng, share, min_keep, later_keep)

    def set_drops(self, first, later=None):
        drops.append(first is not None)
        return real_set(self, first, later)

    def batch(y, *a, **k):
        mixes.append(y.qa_tasks)
        draws.append(y.qa_clip)
        framed.append(0)
        return real_batch(y, *a, **k)

    def step(self, *a, **k):
        if "base" in self.param_groups[0]:  # the QA optimizer (not the tower's or the facts heads')
            rates.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    def pointer(self, *a, **k):
        framed[-1] += 1
        return real_pointer(self, *a, **k)

    monkeypatch.setattr(train_demo, "qa_batch", batch)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(train_demo.FramePointer, "__call__", pointer)
    monkeypatch.setattr(train_demo.KeyDropout, "set", set_drops)
    monkeypatch.setattr(train_demo, "draw_drops", draw_drops)
    torch.set_num_threads(1)
    monkeypatch.setitem(train_demo.YARDSTICKS, "tiny", TINY)
    y, args = train_demo.parse_args(["--yardstick", "tiny", "--out", str(tmp_path / "m"), "--save-minutes", "99"])
    train_demo.train(y, args, [], torch.device("cpu"), train_demo.Checkpointer(tmp_path / "m" / "s.pt", 99, None))
    first, second, third, fourth, fifth, sixth, seventh, eighth, ninth = TINY.cycles
    assert mixes == [TINY.qa_tasks] * 2 + [TINY.temporal_tasks] * 2 + [c.tasks for c in TINY.cycles for _ in (0, 1)]
    assert first.tasks != TINY.temporal_tasks and third.tasks != first.tasks != fourth.tasks != fifth.tasks
    assert 0 < first.lr < 1 and 0 < eighth.lr < 1
    drawing = (third, fourth, fifth, sixth, seventh, eighth, ninth)
    assert draws == [TINY.qa_clip] * 8 + [c.draw for c in drawing for _ in (0, 1)]
    assert third.draw is not TINY.qa_clip and sixth.draw is not third.draw and seventh.draw is not sixth.draw
    assert eighth.draw is not seventh.draw and eighth.tasks != seventh.tasks
    assert ninth.draw is eighth.draw and ninth.tasks != eighth.tasks
    later = (second, *drawing)
    assert framed == [0] * 6 + [len(c.frame_pointer_layers) for c in later for _ in (0, 1)]
    assert all(c.frame_pointer_weight > 0 for c in later)
    assert drops == [False] * 10 + [True, False] * 12  # each of their steps: set, then unset after backward
    assert all(c.key_dropout > 0 for c in (fourth, fifth, sixth, seventh, eighth, ninth))
    assert later_keeps == [None] * 10 + [ninth.later_keep] * 2 and ninth.later_keep[1] <= 0.3
    assert not any(c.key_dropout for c in (first, second, third))

    def cosine(s: int, steps: int) -> float:
        return (s + 1) / 60 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))

    assert rates[3] == pytest.approx(args.lr * cosine(3, 4))
    for i, cycle in enumerate(TINY.cycles):
        for s in (0, 1):
            assert rates[4 + 2 * i + s] == pytest.approx(args.lr * cycle.lr * cosine(s, 2))


def test_a_trained_checkpoint_continues_with_the_later_cycles_only(tmp_path, monkeypatch):
    """``--init DIR --from-cycle K`` (how the shipped HD model got its last cycle): the weights start as
    DIR's, there is no tower stage, only ``--qa-steps`` QA-stage steps and then cycles K.. train, and
    the training record (EVAL.json) goes on from DIR's: its history first, later steps after it.
    ``--train-seed`` starts the training draws from another seed (the earlier run's were [1, 2])."""
    torch.set_num_threads(1)
    monkeypatch.setitem(train_demo.YARDSTICKS, "tiny", TINY)
    first = tmp_path / "first"
    argv = ["--yardstick", "tiny", "--cycles", "8", "--out", str(first)]
    y, args = train_demo.parse_args(argv)
    earlier = train_demo.train(y, args, argv, torch.device("cpu"), train_demo.Checkpointer(first / "s.pt", 99, None))
    (first / "EVAL.json").write_text(json.dumps({"training": earlier}))

    mixes, towers, loaded, draws = [], [], [], []
    real_batch, real_load = train_demo.qa_batch, train_demo.load_trained

    def batch(y, enc, rng, *a, **k):
        mixes.append(y.qa_tasks)
        draws.append(rng.bit_generator.state)
        return real_batch(y, enc, rng, *a, **k)

    monkeypatch.setattr(train_demo, "qa_batch", batch)
    monkeypatch.setattr(train_demo, "train_tower", lambda *a, **k: towers.append(1))

    def load(*a, **k):
        tok, model = real_load(*a, **k)
        loaded.append({n: p.detach().clone() for n, p in model.state_dict().items()})
        return tok, model

    monkeypatch.setattr(train_demo, "load_trained", load)
    argv = ["--yardstick", "tiny", "--init", str(first), "--from-cycle", "8", "--qa-steps", "1", "--train-seed",
            "8", "--out", str(tmp_path / "later")]
    y, args = train_demo.parse_args(argv)
    later = train_demo.train(y, args, argv, torch.device("cpu"), train_demo.Checkpointer(tmp_path / "s.pt", 99, None))

    trained = torch.load(first / "s.pt", weights_only=False)["model"]  # the first run's final weights
    assert trained.keys() == loaded[0].keys() and all(torch.equal(trained[n], loaded[0][n]) for n in trained)
    assert towers == [] and mixes[1:] == [TINY.cycles[8].tasks] * 2
    assert mixes[0] == TINY.temporal_tasks  # one QA-stage step (TINY's temporal phase starts at once)
    assert draws[0] == np.random.default_rng([8, 2]).bit_generator.state
    assert later["cycle_steps"] == [2, 2, 2, 2, 2, 2, 2, 2, 3] and later["tower_metrics"] == earlier["tower_metrics"]
    n = len(earlier["history"])
    assert later["history"][:n] == earlier["history"] and len(later["history"]) > n
    steps = [h["step"] for h in later["history"]]
    assert steps[n] > 4 + 14 and steps == sorted(steps)
    assert later["command"].startswith(earlier["command"] + ", then ") and "--from-cycle 8" in later["command"]


@pytest.mark.parametrize("extra", [["--from-cycle", "4"], ["--init", "x"], ["--init", "x", "--from-cycle", "9"],
                                   ["--init", "no-such-folder", "--from-cycle", "4"]])
def test_init_and_from_cycle_go_together_within_the_cycles(extra):
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--yardstick", "hd", *extra])


@pytest.mark.parametrize("fastest", ["bfloat16", "float32"])
def test_bf16_autocast_only_where_bf16_is_the_faster_dtype(monkeypatch, fastest):
    monkeypatch.setattr(train_demo, "fastest_dtype", lambda device: (fastest, "timed"))
    assert train_demo.autocast_here(HD, torch.device("cpu")).bf16 == (fastest == "bfloat16")
    assert HD.bf16 and train_demo.autocast_here(YARDSTICKS["demo"], torch.device("cpu")) is YARDSTICKS["demo"]
