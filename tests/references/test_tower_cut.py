"""`--tower-cut` against HF's own tower: a cut after the tower's last read layer gives HF's features on
the kept tokens; a cut inside it equals the tower run whole with the other tokens' keys masked from the
cut on (eager attention, every frame in one batch); answers and first logits equal a run on those
masked features; its FLOPs are what torch's FLOP counter counts."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import VideoLlavaForConditionalGeneration

from tests.conftest import save_tiny_checkpoint
from vidsparse.answer import ClipFeatures
from vidsparse.errors import UserError
from vidsparse.models.tower_cut import TowerCut
from vidsparse.models.visual import ClipGrid, VideoFeatures
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA
from vidsparse.pruning import METHODS

QUESTION = "what color is the square ?"
FRAMES = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Three tower layers, the projector reading the second (-2, as Video-LLaVA-7B): depth 2."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-cut"), kv_heads=2, vision_layers=3, seed=3)


@pytest.fixture(scope="module")
def qa(checkpoint) -> VideoQA:
    return VideoQA.from_pretrained(str(checkpoint), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def eager(checkpoint) -> VideoLlavaForConditionalGeneration:
    return VideoLlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8)


def masked_states(tower, feature_layer: int, pixels: torch.Tensor, layer: int, needed: list[int]) -> torch.Tensor:
    """(T, tower tokens, width) at the layer the projector reads: HF's tower on every token, with every
    key not in `needed` (flat tower-token indices) hidden from `layer` on (a -inf score)."""
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        feature = feature_layer % len(hidden)
        states = hidden[min(layer, feature)]
        frames, tokens, _ = states.shape
        kept = torch.zeros(frames * tokens, dtype=torch.bool)
        kept[needed] = True
        mask = torch.zeros(frames, 1, tokens, tokens)
        mask.masked_fill_(~kept.view(frames, 1, 1, tokens), torch.finfo(torch.float32).min)
        for encoder_layer in tower.encoder.layers[layer:feature]:
            states = encoder_layer(states, mask)
        return states


def masked_tower(eager, pixels: torch.Tensor, cut: TowerCut) -> torch.Tensor:
    """(T * per frame, text width): HF's CLIP tower with every key a frame does not keep hidden from
    `cut.layer` on, then its projector on every token."""
    states = masked_states(eager.model.video_tower, eager.config.vision_feature_layer, pixels, cut.layer,
                           list(cut.rows))
    with torch.no_grad():
        return eager.model.multi_modal_projector(states).flatten(0, 1)


GRID = ClipGrid(FRAMES, 4, 4, True)  # the tiny clip: 8 frames of CLS + 4 x 4 patches


def uneven_rows(method: str, budget: int) -> tuple[int, ...]:
    """What `method`'s first stage keeps of the tiny clip: frames keep unequal counts at the budgets
    used here, so a cut runs two groups of frames."""
    return tuple(METHODS[method]().layout_stage(GRID, budget))


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("rows", [uneven_rows("stprune", 34), uneven_rows("uniform", 10), uneven_rows("stprune", 2)],
                         ids=["stprune", "uniform", "frames-keeping-nothing"])
def test_a_cut_equals_the_tower_with_the_other_keys_masked(qa, eager, frames, layer, rows):
    pixels = qa.model.preprocess(frames)
    cut = TowerCut(layer, rows)
    got = qa.model.tower_cutter().features(pixels, cut).flatten(0, 1)
    expected = masked_tower(eager, pixels, cut)
    torch.testing.assert_close(got[list(rows)], expected[list(rows)], rtol=1e-5, atol=1e-5)
    others = torch.ones(len(got), dtype=torch.bool)
    others[list(rows)] = False
    assert not got[others].any()  # nothing the first stage drops was computed
    if layer == 2:  # after the tower's read layer: HF's own features, unchanged
        hf = qa.model.video_features(pixels).tokens.flatten(0, 1)
        torch.testing.assert_close(got[list(rows)], hf[list(rows)], rtol=1e-5, atol=1e-5)
    else:  # inside it: the kept tokens no longer see the others, so their features change
        hf = qa.model.video_features(pixels).tokens.flatten(0, 1)
        assert not torch.allclose(got[list(rows)], hf[list(rows)], atol=1e-3)


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("method, budget", [("stprune", "25%"), ("uniform", "10")])
def test_answers_equal_a_run_on_the_masked_towers_features(qa, eager, frames, method, budget, layer):
    cut_options = ask_options(method, budget, max_new_tokens=4, tower_cut=layer)
    got = qa.answer(frames, QUESTION, cut_options)
    rows = list(METHODS[method]().layout_stage(GRID, got.plan.budget))
    masked = masked_tower(eager, qa.model.preprocess(frames), TowerCut(layer, tuple(rows)))
    # What the cut never computes is zero. Only stprune's raters read it: a zero row adds the same
    # 1/|text| to every text row's relevance, so they are the raters of the kept tokens alone.
    features = torch.zeros_like(masked)
    features[rows] = masked[rows]
    given = ClipFeatures(VideoFeatures(features.view(FRAMES, 17, -1)), {}, time.perf_counter())
    expected = qa.answer(frames, QUESTION, ask_options(method, budget, max_new_tokens=4), features=given)
    assert got.answer == expected.answer
    torch.testing.assert_close(got.first_logits, expected.first_logits, rtol=1e-4, atol=1e-4)
    assert got.to_dict()["pruning"]["tower_cut"] == layer
    assert "tower_cut" not in expected.to_dict()["pruning"]
    if layer == 2 and method == "uniform":  # the same answers as the whole tower's
        whole = qa.answer(frames, QUESTION, ask_options(method, budget, max_new_tokens=4))
        assert got.answer == whole.answer
        torch.testing.assert_close(got.first_logits, whole.first_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_cut_flops_are_what_the_flop_counter_counts(qa, eager, frames, layer):
    pixels = qa.model.preprocess(frames)
    cut = TowerCut(layer, uneven_rows("stprune", 34))
    cutter = qa.model.tower_cutter()
    cutter_eager = type(cutter)(eager.model.video_tower, eager.model.multi_modal_projector, cutter.depth, 4)
    with FlopCounterMode(display=False) as counter:  # eager attention: CPU SDPA's kernel escapes the counter
        cutter_eager.features(pixels, cut)
    vision = eager.config.vision_config
    patch_embedding = FRAMES * 16 * 3 * vision.patch_size ** 2 * vision.hidden_size  # not counted, as CLIP's
    assert counter.get_total_flops() // 2 - patch_embedding == cutter.flops(FRAMES, cut)


def test_a_tower_whose_projector_reads_its_last_layer_is_cut_after_it():
    """The shipped demo model's projector reads the tower's last layer (-1): its depth is every layer."""
    qa = VideoQA.from_pretrained("shapes-demo", dtype="float32", device="cpu")
    cutter = qa.model.tower_cutter()
    assert cutter.depth == len(qa.model.model.model.video_tower.encoder.layers)
    pixels = qa.model.preprocess(np.random.default_rng(1).integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8))
    rows = list(uneven_rows("stprune", 14))
    got = cutter.features(pixels, TowerCut(cutter.depth, tuple(rows))).flatten(0, 1)
    hf = qa.model.video_features(pixels).tokens.flatten(0, 1)
    torch.testing.assert_close(got[rows], hf[rows], rtol=1e-5, atol=1e-5)


def test_the_towers_unread_layer_is_dropped_and_every_feature_stays_hfs(checkpoint, qa, frames):
    """HF runs the tower's last layer and the projector reads the one before (-2): vidsparse drops that
    layer at load (every method, `none` too) and its features are HF's, bit for bit."""
    hf = VideoLlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert len(hf.model.video_tower.encoder.layers) == 3
    assert len(qa.model.model.model.video_tower.encoder.layers) == 2 == qa.model.tower_cutter().depth
    pixels = qa.model.preprocess(frames)
    ours = qa.model.video_features(pixels).tokens
    with torch.no_grad():
        theirs = hf.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output
    assert torch.equal(ours, theirs.view_as(ours))


@pytest.mark.parametrize(("read", "kept"), [(-7, None), (4, None), (-4, 3), (0, 3), (1, 1), (-3, 1)])
def test_a_feature_layer_outside_the_tower_is_refused_at_load_and_one_inside_keeps_its_layers(tmp_path, read, kept):
    """hidden_states of a 3-layer tower are -4..3 (0, -4: the embeddings, which drop no layer)."""
    save_tiny_checkpoint(tmp_path, vision_layers=3, vision_feature_layer=read)
    if kept is None:
        with pytest.raises(UserError, match=f"vision_feature_layer {read} names no hidden state of a 3-layer tower"):
            VideoQA.from_pretrained(str(tmp_path), dtype="float32", device="cpu")
        return
    loaded = VideoQA.from_pretrained(str(tmp_path), dtype="float32", device="cpu")
    assert len(loaded.model.model.model.video_tower.encoder.layers) == kept


def test_a_cut_is_refused_where_it_cannot_apply(qa, frames):
    with pytest.raises(UserError, match="layout alone"):
        qa.answer(frames, QUESTION, ask_options("fastv", "25%", tower_cut=1))
    with pytest.raises(UserError, match="from 0 to 2"):
        qa.answer(frames, QUESTION, ask_options("stprune", "25%", tower_cut=3))
    none = qa.answer(frames, QUESTION, ask_options("none", max_new_tokens=4, tower_cut=1))  # keeps every token
    assert "tower_cut" not in none.to_dict()["pruning"]
    assert none.vision_flops == qa.model.vision_flops(qa.smallest_clip(ask_options()))


def test_a_family_whose_tower_cannot_be_cut_refuses_a_cut(tiny_qwen):
    qa = VideoQA.from_pretrained(str(tiny_qwen), dtype="float32", device="cpu")
    with pytest.raises(UserError, match="cannot be cut"):
        qa.check_options(ask_options("stprune", "25%", tower_cut=0))


# -- LLaVA-OneVision: SigLIP, its projected patches pooled bilinearly (7 x 7 -> 4 x 4 here, where tokens
# share patches, as on the 27 x 27 grid of the real checkpoints) --


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """Three SigLIP layers on 49 px frames (7 x 7 patches), the projector reading the second: depth 2;
    the family and an eager copy."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lab.tiny_onevision import save_tiny_onevision

    path = save_tiny_onevision(tmp_path_factory.mktemp("tiny-ov-cut"), seed=3, vision_layers=3,
                               vision_feature_layer=-2, text_layers=2, image_size=49)
    eager_ov = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
    return VideoQA.from_pretrained(str(path), dtype="float32", device="cpu"), eager_ov


def pooled_reads(eager_ov) -> list[set[int]]:
    """Which patches each pooled token reads, from HF's own pooling applied to a basis."""
    grid = eager_ov.config.vision_config.image_size // eager_ov.config.vision_config.patch_size
    with torch.no_grad():
        weights = eager_ov.model.apply_pooling(torch.eye(grid * grid)[None])[0]  # (tokens, patches)
    return [set(weights[t].nonzero().flatten().tolist()) for t in range(len(weights))]


def masked_onevision(eager_ov, pixels: torch.Tensor, layer: int, rows: list[int]) -> torch.Tensor:
    """(T * pooled tokens, text width): HF's SigLIP with every key a frame's kept tokens do not read
    hidden from `layer` on, its projector and its pooling."""
    reads = pooled_reads(eager_ov)
    vision = eager_ov.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    needed = [row // len(reads) * patches + patch for row in rows for patch in reads[row % len(reads)]]
    states = masked_states(eager_ov.model.vision_tower, eager_ov.config.vision_feature_layer, pixels, layer, needed)
    with torch.no_grad():
        return eager_ov.model.apply_pooling(eager_ov.model.multi_modal_projector(states)).flatten(0, 1)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_a_onevision_cut_equals_its_tower_with_the_unread_patches_masked(onevision, frames, layer):
    qa_ov, eager_ov = onevision
    cutter = qa_ov.model.tower_cutter()
    assert cutter.depth == 2 and cutter.reads == [tuple(sorted(r)) for r in pooled_reads(eager_ov)]
    pixels = qa_ov.model.preprocess(frames)
    reads = pooled_reads(eager_ov)
    assert any(reads[a] & reads[b] for a in range(16) for b in range(a))  # tokens share patches
    rows = list(METHODS["stprune"]().layout_stage(cutter.clip_grid(FRAMES), 10))  # frames keep 2 or 3 of 16
    got = cutter.features(pixels, TowerCut(layer, tuple(rows))).flatten(0, 1)
    torch.testing.assert_close(got[rows], masked_onevision(eager_ov, pixels, layer, rows)[rows], rtol=1e-5,
                               atol=1e-5)
    others = torch.ones(len(got), dtype=torch.bool)
    others[rows] = False
    assert not got[others].any()  # a token not kept is zero, even where it shares patches with a kept one
    if layer == 2:  # after the tower's read layer: HF's own features
        hf = qa_ov.model.video_features(pixels).tokens.flatten(0, 1)
        torch.testing.assert_close(got[rows], hf[rows], rtol=1e-5, atol=1e-5)
    vision = eager_ov.config.vision_config
    with FlopCounterMode(display=False) as counter:  # eager attention: CPU SDPA's kernel escapes the counter
        type(cutter)(eager_ov.model.vision_tower, eager_ov.model.multi_modal_projector, 2, 7, 4,
                     qa_ov.model.pool, eager_ov.model.apply_pooling).features(pixels, TowerCut(layer, tuple(rows)))
    patch_embedding = FRAMES * 49 * 3 * vision.patch_size ** 2 * vision.hidden_size  # not counted, as CLIP's
    assert counter.get_total_flops() // 2 - patch_embedding == cutter.flops(FRAMES, TowerCut(layer, tuple(rows)))


def test_a_onevision_run_with_a_cut_reports_it(onevision, frames):
    qa_ov, _ = onevision
    got = qa_ov.answer(frames, QUESTION, ask_options("stprune", "25%", max_new_tokens=2, tower_cut=1))
    assert got.to_dict()["pruning"]["tower_cut"] == 1
    assert got.vision_flops < qa_ov.answer(frames, QUESTION, ask_options("stprune", "25%", max_new_tokens=2)
                                           ).vision_flops
