"""The demo trainer on the LLaVA-OneVision family (``--family llava_onevision``): batches built by the
family's own ``prompt_ids`` / ``preprocess``, loss on the answer only, a tiny run end to end (tower stage
on SigLIP's patch tokens, QA stage, held-out evaluation), and a killed run that resumes to the same weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import train_demo
from lab.yardsticks import DEMO

TINY_OV = dataclasses.replace(
    DEMO,
    name="tiny-ov",
    onevision_arch={
        "patch_size": 8,  # 4 x 4 patches a frame, pooled to 2 x 2: 8 x 4 + 1 = 33 video rows
        "vision_hidden": 16,
        "vision_layers": 1,
        "vision_heads": 2,
        "text_hidden": 16,
        "text_layers": 1,
        "text_heads": 2,
        "kv_heads": 1,
        "vision_feature_layer": -1,
    },
    defaults={**DEMO.defaults, "tower_steps": 2, "tower_batch": 1, "qa_steps": 3, "batch": 2, "eval_every": 3,
              "monitor_n": 1, "eval_n": 5},
)
def recording_draws(y):
    """`y` drawing its QA clips as the demo yardstick does, and the list of what it drew."""
    drawn = []

    def draw(rng, qtype, max_objects):
        drawn.append(DEMO.qa_clip(rng, qtype, max_objects))
        return drawn[-1]

    return dataclasses.replace(y, qa_clip=draw), drawn


ARGS = ["--yardstick", "tiny-ov", "--family", "llava_onevision", "--save-minutes", "0", "--threads", "1"]


def test_the_onevision_model_has_its_own_defaults_and_only_the_demo_yardstick_has_one():
    y, args = train_demo.parse_args(["--family", "llava_onevision"])
    assert y is DEMO and args.out == Path("vidsparse/shipped/shapes-onevision") and args.qa_steps == 3000
    _, args = train_demo.parse_args([])
    assert args.family == "video_llava" and args.out == Path("vidsparse/shipped/shapes-videollava")
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--yardstick", "hd", "--family", "llava_onevision"])


def test_a_batch_is_what_the_family_feeds_inference_with_the_answer_labelled():
    from vidsparse.models.family import ClipShape
    from vidsparse.models.llava_onevision import LlavaOnevision

    y, drawn = recording_draws(TINY_OV)
    torch.manual_seed(0)
    tok, model = train_demo.build(y, torch.device("cpu"), "llava_onevision")
    assert model.config.model_type == "llava_onevision"
    enc = train_demo.encoder(y, model, tok)
    family = enc.family
    assert isinstance(family, LlavaOnevision) and enc.n_visual == 8 * 4 + 1
    batch, _ = train_demo.qa_batch(y, enc, np.random.default_rng(3), 4, 4, torch.device("cpu"))
    clip_shape = ClipShape(y.data.FRAMES, y.data.SIZE, y.data.SIZE)
    for b, (clip, question, answer) in enumerate(drawn):
        prompt = family.prompt_ids(question, clip_shape)[0]
        answer_ids = tok(answer, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
        n, m = len(prompt), len(answer_ids)
        assert torch.equal(batch["input_ids"][b, :n], prompt)
        assert batch["input_ids"][b, n : n + m].tolist() == answer_ids
        assert (batch["labels"][b, :n] == -100).all() and batch["labels"][b, n : n + m].tolist() == answer_ids
        assert (batch["labels"][b, n + m :] == -100).all()
        torch.testing.assert_close(batch["pixel_values_videos"][b], family.preprocess(clip.frames), rtol=0, atol=0)
    loss = model(**batch).loss  # HF's own forward takes the batch as it is
    assert torch.isfinite(loss)


def test_patch_heads_read_siglip_patch_tokens_at_the_feature_layer():
    torch.manual_seed(0)
    tok, model = train_demo.build(TINY_OV, torch.device("cpu"), "llava_onevision")
    enc = train_demo.encoder(TINY_OV, model, tok)
    px, lab = train_demo.tower_batch(TINY_OV, np.random.default_rng(0), 2, "cpu", enc)
    assert px.shape == (2, 8, 3, 32, 32) and lab["color"].shape == (2 * 8, 16, 1)  # 4 x 4 patches, no CLS
    heads = train_demo.PatchHeads(16)
    loss, metrics = train_demo.tower_losses(TINY_OV, model, heads, px, lab)
    assert torch.isfinite(loss) and set(metrics) == {"color", "shape", "background", "center_px"}


def _run(tmp_path: Path, name: str, monkeypatch, kill: int | None = None) -> dict:
    """train() on the tiny OneVision yardstick, the state saved at every step; ``kill=n`` raises on the
    n-th QA batch, like a process killed mid-run, and the next call resumes."""
    monkeypatch.setitem(train_demo.YARDSTICKS, "tiny-ov", TINY_OV)
    y, args = train_demo.parse_args([*ARGS, "--out", str(tmp_path / name)])
    state_path = args.out / train_demo.STATE_FILE
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if kill is not None:
        original, calls = train_demo.qa_batch, []

        def dies(*a, **k):
            calls.append(1)
            if len(calls) == kill:
                raise KeyboardInterrupt
            return original(*a, **k)

        monkeypatch.setattr(train_demo, "qa_batch", dies)
    try:
        train_demo.train(y, args, ARGS, torch.device("cpu"), train_demo.Checkpointer(state_path, 0, state))
    finally:
        monkeypatch.undo()
    return torch.load(state_path, weights_only=False)


def test_a_killed_onevision_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    whole = _run(tmp_path, "whole", monkeypatch)
    assert whole["stage"] == "done" and whole["training"]["family"] == "llava_onevision"
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "killed", monkeypatch, kill=2)
    done = _run(tmp_path, "killed", monkeypatch)
    assert done["training"]["resumed"] == 1
    for key, value in whole["model"].items():
        assert torch.equal(value, done["model"][key]), key


def test_a_tiny_onevision_run_trains_saves_and_evaluates_through_the_family(tmp_path, monkeypatch):
    from vidsparse.models.llava_onevision import LlavaOnevision
    from vidsparse.models.loading import load_family

    monkeypatch.setitem(train_demo.YARDSTICKS, "tiny-ov", TINY_OV)
    out = tmp_path / "ov"
    assert train_demo.main([*ARGS, "--out", str(out)]) == 0
    report = json.loads((out / "EVAL.json").read_text())
    assert report["training"]["family"] == "llava_onevision" and report["training"]["qa_steps"] == 3
    results = report["evaluation"]["results"]
    assert set(results) == {*DEMO.data.QUESTION_TYPES, "overall"} and results["overall"]["n"] == 5
    assert not (out / train_demo.STATE_FILE).exists() and (out / "EVAL.md").exists()
    loaded = load_family(None, str(out), "float32", "cpu")
    assert isinstance(loaded, LlavaOnevision) and loaded.mean == (0.5, 0.5, 0.5)
