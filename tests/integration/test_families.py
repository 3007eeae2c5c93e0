"""Every family through the pipeline and the command line: found by its config's model_type, every
method answering at the exact budget, and what a family cannot do refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_cli import ask
from vidsparse.errors import UserError
from vidsparse.pipeline import VideoQA
from vidsparse.pruning import METHODS

FAMILIES = ["tiny_checkpoint", "tiny_onevision", "tiny_qwen"]


@pytest.fixture(scope="module", params=FAMILIES)
def qa(request) -> VideoQA:
    return VideoQA.from_pretrained(str(request.getfixturevalue(request.param)))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_answers_at_the_exact_budget(qa, clips, method):
    """B visual tokens after the last stage; for a method that chooses keys while decoding (DyCoke), B
    is what a decoded token sees (the first fed-back token always chooses)."""
    decodes = METHODS[method]().decoding_layer(4) is not None
    stats = qa.ask(clips["h264"], "what color is the square ?", method=method, budget="25%",
                   max_new_tokens=2 if decodes else 3).to_dict()
    tokens = stats["tokens"]
    budget = tokens["visual_before"] if method == "none" else tokens["visual_before"] // 4
    if decodes:
        assert tokens["generated"] == 2 and tokens["visual_after"] > budget
        assert tokens["visual_while_decoding"] == budget and stats["pruning"]["decoding_layer"] == 2
    else:
        assert tokens["visual_after"] == budget and "visual_while_decoding" not in tokens
    assert stats["flops"]["prefill"] <= stats["flops"]["prefill_unpruned"]


def test_each_family_is_found_by_its_model_type(qa):
    assert type(qa.model).model_type == qa.model.model.config.model_type


def test_compact_positions_are_refused_where_positions_are_3d(tiny_qwen, clips):
    qa = VideoQA.from_pretrained(str(tiny_qwen))
    with pytest.raises(UserError, match="3-D .* use --positions keep"):
        qa.ask(clips["h264"], "what color is the square ?", method="fastv", budget=20, positions="compact")


@pytest.mark.parametrize("checkpoint, renumbered", [("tiny_checkpoint", "compact"), ("tiny_onevision", "compact"),
                                                     ("tiny_qwen", "keep")])
def test_default_positions_are_the_authors(request, checkpoint, renumbered, clips):
    """By default VidCom² renumbers positions where its original does (1-D RoPE) and keeps Qwen2.5-VL's
    3-D ones; FastV keeps them everywhere: each answers as with that mode asked for."""
    qa = VideoQA.from_pretrained(str(request.getfixturevalue(checkpoint)))
    question = "what color is the square ?"
    for method, expected in (("vidcom2", renumbered), ("fastv", "keep")):
        default = qa.ask(clips["h264"], question, method=method, budget=20, max_new_tokens=2)
        chosen = qa.ask(clips["h264"], question, method=method, budget=20, max_new_tokens=2, positions=expected)
        assert default.to_dict()["pruning"]["positions"] == expected
        assert torch.equal(default.first_logits, chosen.first_logits)


@pytest.mark.parametrize("checkpoint", ["tiny_onevision", "tiny_qwen"])
def test_ask_runs_a_new_family_from_the_command_line(request, checkpoint, clips):
    result = ask(clips["h264"], "what color is the square ?", "--model", request.getfixturevalue(checkpoint),
                 "--method", "sparsevlm", "--budget", "25%", "--json", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["tokens"]["visual_after"] == stats["tokens"]["visual_before"] // 4


def test_a_checkpoint_of_another_family_is_one_line(tmp_path, clips):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    result = ask(clips["h264"], "what ?", "--model", folder)
    assert result.exit_code == 2
    assert "model_type is 'llava'; supported: video_llava, llava_onevision, qwen2_5_vl" in result.stderr


@pytest.mark.parametrize("checkpoint", ["tiny_onevision", "tiny_qwen"])
def test_show_kept_draws_each_familys_frames_and_grid(request, checkpoint, clips, tmp_path):
    """The picture is drawn from the family's own view of the frames (OneVision: squashed square,
    Qwen2.5-VL: its dynamic size) and token grid (a Qwen token on both frames of its span)."""
    from PIL import Image

    picture = tmp_path / "kept.png"
    result = ask(clips["h264"], "what color is the square ?", "--model", request.getfixturevalue(checkpoint),
                 "--method", "uniform", "--budget", "16", "--max-new-tokens", "2", "--show-kept", picture)
    assert result.exit_code == 0, result.output
    with Image.open(picture) as image:
        assert image.width > 300 and image.height > 200


def test_fps_sampling_reaches_the_time_positions(tiny_qwen, clips):
    """--fps samples by seconds (the 2 s test clip at 3 frames a second: 6 frames, 3 spans of 2) and
    Qwen2.5-VL's time positions follow the sampled rate: a span is 2 / 3 s, 2 tokens a second."""
    result = ask(clips["h264"], "what color is the square ?", "--model", tiny_qwen, "--fps", "3", "--json",
                 "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert len(stats["video"]["frame_indices"]) == 6
    from vidsparse.options import ask_options
    from vidsparse.pipeline import clip_shape_of
    from vidsparse.video import decode_clip

    model = VideoQA.from_pretrained(str(tiny_qwen)).model
    clip = clip_shape_of(decode_clip(clips["h264"], ask_options(fps=3)))
    assert (clip.frames, clip.fps) == (6, 3.0)
    prompt = model.embed(model.prompt_ids("what ?", clip), model.video_features(model.preprocess(
        decode_clip(clips["h264"], ask_options(fps=3)).frames)), clip)
    time = prompt.rope_positions[0, 0, prompt.visual.positions]
    # int(span x 2 tokens a second x 2/3 s a span) after the video's start: 0, 1, 2 (HF's default: 0, 2, 4)
    assert (time - time[0]).unique().tolist() == [0, 1, 2] and prompt.visual.frames_per_span == 2


def test_batch_refuses_what_a_family_cannot_do_before_answering(tiny_qwen, clips, tmp_path):
    """A plan the family cannot run fails every question: refused in one line up front, not recorded as an
    error for each question."""
    from typer.testing import CliRunner

    from tests.integration.test_hostile import assert_one_line_error
    from vidsparse.cli import app

    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(app, ["batch", str(clips["h264"].parent), "--question", "what color is the square ?",
                                      "--model", str(tiny_qwen), "--method", "fastv", "--budget", "20",
                                      "--positions", "compact", "--out", str(out)])
    assert_one_line_error(result, "use --positions keep")


@pytest.mark.parametrize("checkpoint, part, key", [("tiny_qwen", "text_config", "num_attention_heads"),
                                                    ("tiny_onevision", "vision_config", "patch_size"),
                                                    ("tiny_qwen", "vision_config", "spatial_merge_size")])
def test_a_size_of_zero_in_a_config_is_one_line(request, tmp_path, clips, checkpoint, part, key):
    import shutil

    from tests.integration.test_hostile import assert_one_line_error

    folder = shutil.copytree(request.getfixturevalue(checkpoint), tmp_path / "broken")
    config = json.loads((folder / "config.json").read_text())
    config[part][key] = 0
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(ask(clips["h264"], "what ?", "--model", folder), f"{part}.{key} is 0, must be a positive")


def test_the_base_class_loads_whichever_family_a_checkpoint_is(tiny_qwen, tiny_onevision):
    from vidsparse.models.family import VideoModel
    from vidsparse.models.llava_onevision import LlavaOnevision
    from vidsparse.models.qwen2_5_vl import Qwen25VL

    assert type(VideoModel.from_pretrained(str(tiny_qwen))) is Qwen25VL
    with pytest.raises(UserError, match="is a llava_onevision checkpoint, not qwen2_5_vl"):
        Qwen25VL.from_pretrained(str(tiny_onevision))
    assert type(LlavaOnevision.from_pretrained(str(tiny_onevision))) is LlavaOnevision


def test_a_qwen_checkpoint_sizes_frames_by_its_own_video_processor(tiny_qwen, tmp_path, clips):
    """video_preprocessor_config.json's bounds (as transformers 5 saves a video processor) decide a frame's
    size, as Qwen2-VL's processors size it with those bounds; a malformed file is one line."""
    import shutil

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.conftest import moving_square_frames
    from tests.integration.test_hostile import assert_one_line_error

    folder = shutil.copytree(tiny_qwen, tmp_path / "small-frames")
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1024, "longest_edge": 16384}}))
    qa = VideoQA.from_pretrained(str(folder))
    stats = qa.ask(clips["h264"], "what color is the square ?", max_new_tokens=1).to_dict()
    processor = Qwen2VLImageProcessorPil(min_pixels=1024, max_pixels=16384, patch_size=14, merge_size=2)
    grid = processor(images=[moving_square_frames(1)[0]], return_tensors="pt")["image_grid_thw"][0]
    assert stats["tokens"]["visual_before"] == 4 * int(grid[1] * grid[2]) // 4  # 8 frames: 4 spans, 2 x 2 merged
    assert stats["tokens"]["visual_before"] < VideoQA.from_pretrained(str(tiny_qwen)).ask(
        clips["h264"], "what color is the square ?", max_new_tokens=1).to_dict()["tokens"]["visual_before"]
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"min_pixels": 5000, "max_pixels": 10}))
    assert_one_line_error(ask(clips["h264"], "what ?", "--model", folder),
                          "video_preprocessor_config.json's pixel bounds must be positive integers, min <= max")
