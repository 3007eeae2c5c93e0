"""The demo trainer on the Qwen2.5-VL family (``--family qwen2_5_vl``): batches built by the family's own
``prompt_ids`` / ``preprocess`` and fed to HF's model as its processor would (flat patches, grids, token
types, seconds a temporal patch), a tower stage whose heads read every patch of the merger's input in the
frames' raster order, and a tiny run end to end whose checkpoint ships the pixel bounds it was trained with,
so that inference sizes its frames as training did."""

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
    defaults={**DEMO.defaults, "tower_steps": 2, "tower_batch": 1, "qa_steps": 3, "batch": 2, "eval_every": 3,
              "monitor_n": 1, "eval_n": 5},
)
ARGS = ["--yardstick", "tiny-qwen", "--family", "qwen2_5_vl", "--save-minutes", "0", "--threads", "1"]


def test_the_qwen_model_has_its_own_output_and_the_yardsticks_stages():
    y, args = train_demo.parse_args(["--family", "qwen2_5_vl"])
    assert args.out.name == "shapes-qwen"
    assert (args.tower_steps, args.tower_freeze) == (DEMO.defaults["tower_steps"], DEMO.defaults["tower_freeze"])


def test_merge_units_put_in_raster_order_are_the_frames_patches_cut_row_by_row():
    """The family's pixels come in merge-window order; put back in raster order they must be the
    normalised frames cut into p x p patches row by row, each patch its two frames (the labels' order)."""
    from vidsparse.preprocess import normalize

    torch.manual_seed(0)
    tok, model = train_demo.build(TINY_QWEN, torch.device("cpu"), "qwen2_5_vl")
    enc = train_demo.encoder(TINY_QWEN, model, tok)
    clip = TINY_QWEN.tower_clip(np.random.default_rng(0))
    px = enc.family.preprocess(clip.frames)  # (spans, rows, cols, m*m, c*2*p*p)
    spans, rows, cols = px.shape[:3]
    raster = train_demo.units_to_raster(px.view(spans, rows, cols, 2, 2, -1))
    frames = normalize(enc.family.seen_frames(clip.frames), enc.family.mean, enc.family.std)  # (T, c, H, W)
    p = enc.patch
    t, c, height, width = frames.shape
    cut = frames.view(t // 2, 2, c, height // p, p, width // p, p).permute(0, 3, 5, 2, 1, 4, 6)
    torch.testing.assert_close(raster, cut.reshape(t // 2, (height // p) * (width // p), -1), rtol=0, atol=0)


def test_patch_heads_read_the_merger_input_in_raster_order_with_each_frames_labels():
    """Regrouped into merge units, the states the heads read must give HF's own merged video tokens
    (which HF puts back from the ViT's window order); each patch's labels are its two frames'."""
    torch.manual_seed(0)
    y = DEMO  # the yardstick's own ViT: 4 x 4 merged tokens a frame in windows of 2 x 2, so the order matters
    tok, model = train_demo.build(y, torch.device("cpu"), "qwen2_5_vl")
    enc = train_demo.encoder(y, model, tok)
    px, lab = train_demo.tower_batch(y, np.random.default_rng(1), 2, "cpu", enc)
    clips = [y.tower_clip(np.random.default_rng(1)) for _ in range(1)]  # the batch's first clip, drawn again
    first = clips[0].patch_labels(patch=enc.patch)
    spans = px.shape[1]
    for f in range(2 * spans):
        assert np.array_equal(lab["color"][f // 2, :, f % 2].numpy(), first["color"][f])
    visual = model.model.visual
    with torch.no_grad():
        states = train_demo.patch_states(model, px)  # (clips * spans, patches, d)
        n, patches, d = states.shape
        side = int(patches**0.5)
        units = states.view(n, side // 2, 2, side // 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, d)
        grid = torch.tensor([[spans, side, side]] * 2)
        hf = torch.cat(list(model.model.get_video_features(px.reshape(-1, px.shape[-1]), grid).pooler_output))
        torch.testing.assert_close(visual.merger(units), hf)
    heads = train_demo.PatchHeads(visual.config.hidden_size, 2)
    loss, metrics = train_demo.tower_losses(y, model, heads, px, lab)
    assert torch.isfinite(loss) and set(metrics) == {"color", "shape", "background", "center_px"}


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
    assert report["training"]["family"] == "qwen2_5_vl" and set(report["training"]["tower_metrics"]) == {
        "color", "shape", "background", "center_px"}
    assert report["evaluation"]["results"]["overall"]["n"] == 5
    assert json.loads((out / "video_preprocessor_config.json").read_text())["size"] == {
        "shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    qa = VideoQA.from_pretrained(str(out))
    assert isinstance(qa.model, Qwen25VL) and (qa.model.min_pixels, qa.model.max_pixels) == (1024, 4096)
    clip = DEMO.make(tmp_path / "clips", 1, 5)
    item = json.loads(clip.read_text().splitlines()[0])
    stats = qa.ask(tmp_path / "clips" / item["video"], item["question"], max_new_tokens=2).to_dict()
    assert stats["tokens"]["visual_before"] == 4 * 2 * 2
