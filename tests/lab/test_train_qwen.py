"""The demo trainer on the Qwen2.5-VL family (``--family qwen2_5_vl``): batches built by the family's own
``prompt_ids`` / ``preprocess`` and fed to HF's model as its processor would (flat patches, grids, token
types, seconds a temporal patch), no tower stage, and a tiny run end to end whose checkpoint ships the
pixel bounds it was trained with, so that inference sizes its frames as training did."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from lab import train_demo
from lab.yardsticks import DEMO
from tests.lab.test_train_onevision import recording_draws

TINY_QWEN = dataclasses.replace(
    DEMO,
    name="tiny-qwen",
    qwen_arch={"patch_size": 8, "window_size": 32, "vision_hidden": 16, "vision_layers": 2, "vision_heads": 2,
               "fullatt_block_indexes": (1,), "text_hidden": 32, "text_layers": 2, "text_heads": 2, "kv_heads": 1,
               "mrope_section": (2, 3, 3)},
    defaults={**DEMO.defaults, "qa_steps": 3, "batch": 2, "eval_every": 3, "monitor_n": 1, "eval_n": 5},
)
ARGS = ["--yardstick", "tiny-qwen", "--family", "qwen2_5_vl", "--save-minutes", "0", "--threads", "1"]


def test_the_qwen_model_has_its_own_defaults_and_no_tower_stage():
    y, args = train_demo.parse_args(["--family", "qwen2_5_vl"])
    assert args.out.name == "shapes-qwen" and args.tower_steps == 0 and args.tower_freeze == 0


def test_a_batch_is_what_the_family_feeds_hf_with_the_answer_labelled():
    from vidsparse.models.qwen2_5_vl import Qwen25VL

    y, drawn = recording_draws(TINY_QWEN)
    torch.manual_seed(0)
    tok, model = train_demo.build(y, torch.device("cpu"), "qwen2_5_vl")
    enc = train_demo.encoder(y, model, tok)
    assert isinstance(enc.family, Qwen25VL) and enc.n_visual == 4 * 2 * 2  # 32 px, patch 8: 2 x 2 tokens a span
    batch, _ = train_demo.qa_batch(y, enc, np.random.default_rng(3), 2, 4, torch.device("cpu"))
    pixels = torch.stack([enc.family.preprocess(clip.frames) for clip, _, _ in drawn])
    expected = enc.family.hf_video_inputs(pixels, batch["input_ids"], enc.clip)
    assert set(expected) <= set(batch) and "second_per_grid_ts" in expected
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
    assert torch.isfinite(model(**batch).loss)


def test_a_tiny_qwen_run_trains_saves_and_answers_through_vidsparse(tmp_path, monkeypatch):
    from vidsparse.models.qwen2_5_vl import Qwen25VL
    from vidsparse.pipeline import VideoQA

    torch.set_num_threads(1)
    monkeypatch.setitem(train_demo.YARDSTICKS, "tiny-qwen", TINY_QWEN)
    out = tmp_path / "qwen"
    assert train_demo.main([*ARGS, "--out", str(out)]) == 0
    report = json.loads((out / "EVAL.json").read_text())
    assert report["training"]["family"] == "qwen2_5_vl" and report["training"]["tower_metrics"] == {}
    assert report["evaluation"]["results"]["overall"]["n"] == 5
    assert json.loads((out / "video_preprocessor_config.json").read_text())["size"] == {
        "shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    qa = VideoQA.from_pretrained(str(out))
    assert isinstance(qa.model, Qwen25VL) and (qa.model.min_pixels, qa.model.max_pixels) == (1024, 4096)
    clip = DEMO.make(tmp_path / "clips", 1, 5)
    item = json.loads(clip.read_text().splitlines()[0])
    stats = qa.ask(tmp_path / "clips" / item["video"], item["question"], max_new_tokens=2).to_dict()
    assert stats["tokens"]["visual_before"] == 4 * 2 * 2
