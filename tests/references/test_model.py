"""The adapter and the explicit prefill/decode loop against transformers' own implementation."""

import json

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from vidsparse.decoding import generate
from vidsparse.errors import UserError
from vidsparse.models import loading
from vidsparse.models.family import ClipShape
from vidsparse.models.video_llava import VideoLlava
from vidsparse.preprocess import preprocess_frames
from vidsparse.stats import StageTimer
from vidsparse.video import decode_video

CLIP = ClipShape(8, 48, 64)  # the test clips' shape


@pytest.fixture(scope="module", params=["tiny_checkpoint", "tiny_checkpoint_mha"])
def loaded(request):
    return VideoLlava.from_pretrained(str(request.getfixturevalue(request.param)))


@pytest.fixture(scope="module")
def pixels(loaded, clips):
    return preprocess_frames(decode_video(clips["h264"], 8).frames, loaded.image_size)


def test_prompt_expands_video_placeholder(loaded):
    ids = loaded.prompt_ids("what is happening ?", CLIP)[0].tolist()
    tok = loaded.tokenizer
    assert loaded.visual_tokens(ClipShape(1, 48, 64)) == 17  # 4 x 4 patches + CLS
    assert ids[0] == tok.bos_token_id
    assert ids.count(loaded.video_token_id) == 8 * 17
    first = ids.index(loaded.video_token_id)
    assert all(i == loaded.video_token_id for i in ids[first : first + 136])
    words = tok.convert_ids_to_tokens(ids[1:first] + ids[first + 136 :])
    assert words == ["user", ":", "what", "is", "happening", "?", "assistant", ":"]


def test_prompt_ids_reject_a_tokenizer_that_splits_the_placeholder(loaded):
    confused = VideoLlava(loaded.model, loaded.tokenizer, "confused")
    confused.video_token_id = loaded.tokenizer.bos_token_id
    with pytest.raises(ValueError, match="video tokens"):
        confused.prompt_ids("what ?", CLIP)


def test_visual_map_is_frame_major_with_cls_first(loaded, pixels):
    ids = loaded.prompt_ids("what ?", CLIP)
    prompt = loaded.embed(ids, loaded.video_features(pixels), CLIP)
    vis = prompt.visual
    assert len(vis) == 136 and vis.positions.tolist() == list(range(3, 139))
    assert vis.frame.tolist() == [f for f in range(8) for _ in range(17)]
    assert vis.is_cls.nonzero().squeeze(1).tolist() == [17 * f for f in range(8)]
    assert vis.row[1:17].tolist() == [r for r in range(4) for _ in range(4)]
    assert vis.col[1:17].tolist() == list(range(4)) * 4


def hf_inputs(loaded, pixels, question="what is happening ?"):
    return {"input_ids": loaded.prompt_ids(question, CLIP), "pixel_values_videos": pixels[None]}


def reference_model(loaded):
    """transformers' own class, loaded independently (with its image tower), eager attention."""
    return VideoLlavaForConditionalGeneration.from_pretrained(
        loaded.name, attn_implementation="eager", dtype=torch.float32
    ).eval()


def test_prefill_logits_equal_transformers_forward(loaded, pixels):
    inputs = hf_inputs(loaded, pixels)
    with torch.no_grad():
        expected = reference_model(loaded)(**inputs).logits[0, -1]
    prompt = loaded.embed(inputs["input_ids"], loaded.video_features(pixels), CLIP)
    ours = generate(loaded.decoder, loaded.lm_head, prompt, 1, loaded.eos_token_ids, StageTimer(loaded.device))
    torch.testing.assert_close(ours.first_logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("question", ["what is happening ?", "what color is the square ?"])
def test_greedy_decode_equals_transformers_generate(loaded, pixels, question):
    inputs = hf_inputs(loaded, pixels, question)
    with torch.no_grad():
        expected = reference_model(loaded).generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = expected[0, inputs["input_ids"].shape[1] :].tolist()
    if expected[-1] in loaded.eos_token_ids:
        expected = expected[:-1]
    prompt = loaded.embed(inputs["input_ids"], loaded.video_features(pixels), CLIP)
    ours = generate(loaded.decoder, loaded.lm_head, prompt, 12, loaded.eos_token_ids, StageTimer(loaded.device))
    assert len(expected) >= 4, "the random tiny model should say something before EOS"
    assert ours.decoded.token_ids == expected
    # Prompt + every generated token but the last is cached in each layer.
    expected_length = inputs["input_ids"].shape[1] + len(expected) - 1
    assert ours.prefilled.kv_lengths(ours.decoded.steps) == [expected_length] * len(loaded.decoder.layers)


def test_image_tower_is_dropped(loaded):
    assert loaded.model.model.image_tower is None


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        VideoLlava.from_pretrained(str(tmp_path))


def test_folder_of_another_model_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not a checkpoint of a model family vidsparse runs"):
        VideoLlava.from_pretrained(str(tmp_path))


def test_missing_local_path_is_rejected():
    with pytest.raises(UserError, match="neither a local folder nor a hub id"):
        VideoLlava.from_pretrained("./no/such/model")


def test_offline_hub_id_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match="pass --model /path/to/that/folder"):
        VideoLlava.from_pretrained("nobody-here/no-such-video-llava")


@pytest.mark.parametrize(
    "kwargs, message", [({"dtype": "int8"}, "unknown dtype"), ({"device": "tpu"}, "unknown device")]
)
def test_bad_dtype_and_device(tiny_checkpoint, kwargs, message):
    with pytest.raises(UserError, match=message):
        VideoLlava.from_pretrained(str(tiny_checkpoint), **kwargs)


def test_python_api_takes_frames_directly(tiny_checkpoint, clips):
    from vidsparse.pipeline import VideoQA

    qa = VideoQA.from_pretrained(str(tiny_checkpoint))
    frames = decode_video(clips["h264"], 8).frames
    from_frames = qa.ask(frames, "what is happening ?", method="sparsevlm", budget=20, max_new_tokens=4)
    from_file = qa.ask(clips["h264"], "what is happening ?", method="sparsevlm", budget=20, max_new_tokens=4)
    assert from_frames.answer == from_file.answer
    assert from_frames.to_dict()["tokens"]["visual_after"] == 20 and from_frames.video.backend == "given"
