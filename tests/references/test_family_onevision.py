"""The LLaVA-OneVision family module against transformers' own LLaVA-OneVision code, on a tiny random
checkpoint (lab/tiny_onevision.py: 35 px frames, patch 7 -> a 5 x 5 grid pooled to 3 x 3).

The engine-level reference (vidsparse's own prefill/decode equals HF `generate` on this family) comes
once the engine runs on `VideoModel`; here `embed` is shown faithful by HF's forward on its embeddings.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from lab.tiny_onevision import save_tiny_onevision
from vidsparse.errors import UserError
from vidsparse.models.family import ClipShape
from vidsparse.models.llava_onevision import PROMPT_TEMPLATE, LlavaOnevision

# The chat template of HF's LLaVA-OneVision processor (its tests' `prepare_processor_dict`, the
# llava-hf checkpoints' chat_template.json): rendered here by the tokenizer's Jinja, independently of
# the family's PROMPT_TEMPLATE.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTION = "what color is the square ?"
FRAMES = 3


def frames_like_a_clip(n: int = FRAMES, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A gradient, a moving square and noise: every pixel of the resize matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x * 3 + i * 7) % 256
        frames[i, ..., 1] = (y * 4 + i * 5) % 256
        frames[i, ..., 2] = rng.integers(0, 256, (height, width))
        frames[i, 10:22, 4 + 6 * i : 16 + 6 * i] = 255
    return frames


def load(path, attn: str = "sdpa") -> LlavaOnevisionForConditionalGeneration:
    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision"))


@pytest.fixture(scope="module")
def family(checkpoint) -> LlavaOnevision:
    mean, std = LlavaOnevision.default_pixel_stats()
    return LlavaOnevision(load(checkpoint), AutoTokenizer.from_pretrained(checkpoint), str(checkpoint), mean, std)


@pytest.fixture(scope="module")
def clip(family):
    frames = frames_like_a_clip()
    pixels = family.preprocess(frames)
    shape = ClipShape(FRAMES, *frames.shape[1:3])
    ids = family.prompt_ids(QUESTION, shape)
    return types.SimpleNamespace(frames=frames, pixels=pixels, shape=shape, ids=ids,
                                 prompt=family.embed(ids, family.video_features(pixels, saliency=True), shape))


def hf_video_rows(family: LlavaOnevision, frames: int) -> int:
    """What LlavaOnevisionProcessor.replace_video_token expands one <video> to (its own code; the
    processor cannot be built here: its video processor needs torchvision)."""
    vision = family.model.config.vision_config
    processor = types.SimpleNamespace(num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                                      video_token="<video>")
    size = vision.image_size
    text = LlavaOnevisionProcessor.replace_video_token(
        processor, {"pixel_values_videos": [torch.zeros(frames, 3, size, size)]}, 0)
    return text.count("<video>")


def test_config_checks_and_stop_tokens(family):
    config = family.model.config
    assert LlavaOnevision.check_config(config) == []
    assert family.eos_token_ids == {family.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert family.decoder is family.model.model.language_model and family.lm_head is family.model.lm_head
    broken = copy.deepcopy(config)
    broken.vision_feature_select_strategy = "default"
    broken.text_config.layer_types = ["full_attention", "sliding_attention"]
    problems = LlavaOnevision.check_config(broken)
    assert len(problems) == 2 and "full" in problems[0] and "sliding" in problems[1]
    family.model.generation_config.eos_token_id = [7, 31]
    try:
        again = LlavaOnevision(family.model, family.tokenizer, family.name, family.mean, family.std)
    finally:
        family.model.generation_config.eos_token_id = 31
    assert again.eos_token_ids == {7, 31}


# -- 1. pixels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(48, 64), (20, 30), (35, 35), (120, 90)])
def test_pixels_match_hf_image_processor(family, checkpoint, height, width):
    from transformers import LlavaOnevisionImageProcessorPil

    processor = LlavaOnevisionImageProcessorPil.from_pretrained(checkpoint)
    assert tuple(processor.image_mean) == family.mean and tuple(processor.image_std) == family.std
    frames = frames_like_a_clip(2, height, width, seed=height)
    ours = family.preprocess(frames)
    size = family.model.config.vision_config.image_size
    assert ours.shape == (2, 3, size, size)
    for frame, mine in zip(frames, ours, strict=True):
        # the first of the anyres patches is the whole frame resized to size x size
        reference = torch.as_tensor(np.asarray(processor(images=frame, return_tensors="np").pixel_values[0][0]))
        assert reference.shape == mine.shape
        # PIL resamples in fixed point, resize_frames in float: a few values differ by one or two uint8
        # levels (one level is 2/255 in these units). Measured: mean abs difference 0 to 3e-4, at most
        # 138 of 3675 values differ, by at most 2 levels.
        difference = (mine - reference).abs()
        assert difference.mean() < 1e-3
        assert difference.max() < 2 * (2 / 255) + 1e-6
        assert (difference > 1e-5).float().mean() < 0.05


def test_default_pixel_stats_are_siglips_not_clips():
    mean, std = LlavaOnevision.default_pixel_stats()
    assert mean == std == (0.5, 0.5, 0.5)


# -- 2. features and embeddings ------------------------------------------------------------------------


def test_video_features_match_hf(family, clip):
    hf = family.model.model
    with torch.no_grad():
        reference = hf.get_video_features(pixel_values_videos=clip.pixels[None]).pooler_output[0]
    plain = family.video_features(clip.pixels)
    assert plain.tokens.shape == (FRAMES, 9, family.text_config.hidden_size)
    torch.testing.assert_close(plain.tokens.flatten(0, 1), reference[:-1], rtol=0, atol=1e-5)
    assert plain.cls_attention is None and plain.frame_embedding is None
    # the saliency hooks change nothing
    torch.testing.assert_close(family.video_features(clip.pixels, saliency=True).tokens, plain.tokens, rtol=0, atol=0)


def test_embeds_match_the_inputs_embeds_hf_builds(family, clip):
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = family.decoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            family.model(input_ids=clip.ids, pixel_values_videos=clip.pixels[None])
    finally:
        hook.remove()
    torch.testing.assert_close(clip.prompt.embeds, seen["embeds"], rtol=0, atol=1e-5)


# -- 3. layout ---------------------------------------------------------------------------------------


def test_prompt_is_hf_chat_template_expanded(family, clip):
    tokenizer = family.tokenizer
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=HF_CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)
    # the word-level tokenizer drops whitespace: compare the text too (a real Qwen2 tokenizer keeps "\n")
    assert PROMPT_TEMPLATE.format(question=QUESTION) == text
    rows = hf_video_rows(family, FRAMES)
    assert rows == FRAMES * 9 + 1
    expected = tokenizer(text.replace("<video>", "<video>" * rows)).input_ids
    assert clip.ids[0].tolist() == expected
    assert family.visual_tokens(clip.shape) + family.prompt_overhead(clip.shape) == rows


def test_layout_map_newline_and_suffix(family, clip):
    prompt, ids = clip.prompt, clip.ids[0]
    video_id = family.placeholder(family.model.config)[1]
    placeholders = (ids == video_id).nonzero().squeeze(1)
    visual = prompt.visual
    assert len(visual) == FRAMES * 9 == placeholders.numel() - 1
    assert visual.positions.tolist() == placeholders[:-1].tolist()
    assert prompt.head_length == int(placeholders[-1]) + 1
    torch.testing.assert_close(prompt.embeds[0, prompt.head_length - 1], family.model.model.image_newline,
                               rtol=0, atol=0)
    assert not visual.is_cls.any() and visual.frames_per_span == 1
    assert visual.frame.tolist() == [t for t in range(FRAMES) for _ in range(9)]
    assert visual.row.tolist() == [r for _ in range(FRAMES) for r in range(3) for _ in range(3)]
    assert visual.col.tolist() == [c for _ in range(FRAMES) for _ in range(3) for c in range(3)]
    assert prompt.rope_positions.shape == (1, 1, ids.numel())
    assert prompt.rope_positions.flatten().tolist() == list(range(ids.numel()))
    assert prompt.suffix_words == ["what", "color", "is", "the", "square", "?", "<|im_end|>", "<|im_start|>",
                                   "assistant"]


def test_map_rows_and_cols_point_at_their_grid_cell(family, clip):
    """Each mapped token is the bilinear resize of the projected patch grid at (frame, row, col)."""
    hf = family.model.model
    with torch.no_grad():
        states = hf.vision_tower(clip.pixels, output_hidden_states=True).hidden_states[-1]
        grid = hf.multi_modal_projector(states).view(FRAMES, 5, 5, -1).permute(0, 3, 1, 2)
        pooled = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False)
    visual = clip.prompt.visual
    expected = pooled[visual.frame, :, visual.row, visual.col]
    torch.testing.assert_close(clip.prompt.embeds[0, visual.positions], expected, rtol=0, atol=1e-5)


def test_prompt_refuses_special_tokens_and_a_splitting_tokenizer(family, clip):
    with pytest.raises(UserError, match="special token"):
        family.prompt_ids("what is <|im_start|> here ?", clip.shape)
    with pytest.raises(UserError, match="special token"):
        family.prompt_ids("<video> ?", clip.shape)
    tokenizer = family.tokenizer
    try:
        family.tokenizer = _Dropping(tokenizer)
        with pytest.raises(ValueError, match="video tokens"):
            family.prompt_ids(QUESTION, clip.shape)
    finally:
        family.tokenizer = tokenizer


class _Dropping:
    """A tokenizer that merges two `<video>` into one token (a stand-in for one that splits or merges)."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.added_tokens_decoder = tokenizer.added_tokens_decoder
        self.all_special_tokens = tokenizer.all_special_tokens

    def __call__(self, text):
        ids = self.inner(text).input_ids
        ids.remove(self.inner.convert_tokens_to_ids("<video>"))
        return types.SimpleNamespace(input_ids=ids)


def test_embed_refuses_a_wrong_placeholder_count(family, clip):
    video = family.video_features(clip.pixels[:2])
    with pytest.raises(ValueError, match="placeholders"):
        family.embed(clip.ids, video, clip.shape)


# -- 4. HF forward on the embeddings -----------------------------------------------------------------


def test_hf_forward_on_embeds_equals_hf_forward_on_pixels(family, clip):
    with torch.no_grad():
        reference = family.model(input_ids=clip.ids, pixel_values_videos=clip.pixels[None]).logits
        ours = family.model(inputs_embeds=clip.prompt.embeds, position_ids=clip.prompt.rope_positions[0]).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    top = reference[0, -1].topk(2).values  # the scaled LM head: the greedy choice is not decided by float noise
    assert top[0] - top[1] > 0.05


def test_greedy_generation_from_embeds_equals_hf_generate(family, clip):
    with torch.no_grad():
        reference = family.model.generate(input_ids=clip.ids, pixel_values_videos=clip.pixels[None],
                                          max_new_tokens=6, do_sample=False)[0, clip.ids.shape[1] :]
        ours = family.model.generate(inputs_embeds=clip.prompt.embeds, attention_mask=torch.ones_like(clip.ids),
                                     max_new_tokens=6, do_sample=False)[0]
    assert ours.tolist() == reference.tolist()


# -- 5. saliency ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[-1, -2])
def eager_pair(request, tmp_path_factory):
    """A checkpoint whose projector reads layer `vision_feature_layer` of 3, loaded twice: the family on
    SDPA, and an eager copy whose tower returns its attention probabilities."""
    path = save_tiny_onevision(tmp_path_factory.mktemp(f"tiny-ov-layer{request.param}"), seed=3,
                               vision_layers=3, vision_feature_layer=request.param)
    mean, std = LlavaOnevision.default_pixel_stats()
    family = LlavaOnevision(load(path), AutoTokenizer.from_pretrained(path), str(path), mean, std)
    return family, load(path, attn="eager"), request.param % 4  # hidden_states index of the feature layer


def test_saliency_is_attention_received_pooled_like_the_tokens(eager_pair):
    family, eager, feature = eager_pair
    pixels = family.preprocess(frames_like_a_clip())
    video = family.video_features(pixels, saliency=True)
    assert video.cls_attention.shape == (FRAMES, 9)
    assert video.frame_embedding.shape == (FRAMES, family.model.config.vision_config.hidden_size)
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
        received = out.attentions[feature - 1].mean(1).mean(1)  # (T, 25): heads, then queries
        expected = F.interpolate(received.view(FRAMES, 1, 5, 5), size=(3, 3), mode="bilinear").view(FRAMES, 9)
        embedding = tower.post_layernorm(out.hidden_states[feature]).mean(1)
    torch.testing.assert_close(video.cls_attention, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(video.frame_embedding, embedding, rtol=0, atol=1e-5)
    if feature == 3:  # the last layer: what the tower itself returns after its final norm
        torch.testing.assert_close(video.frame_embedding, out.last_hidden_state.mean(1), rtol=0, atol=1e-5)
    assert not torch.allclose(video.cls_attention, video.cls_attention.mean(1, keepdim=True))  # not flat

    shape = ClipShape(FRAMES, 48, 64)
    ids = family.prompt_ids(QUESTION, shape)
    prompt = family.embed(ids, video, shape)
    assert prompt.saliency.shape == (len(prompt.visual),)
    for k in (0, 13, 26):  # the saliency of mapped token k is its own cell's
        frame, row, col = (int(x[k]) for x in (prompt.visual.frame, prompt.visual.row, prompt.visual.col))
        assert abs(float(prompt.saliency[k]) - float(expected[frame, row * 3 + col])) < 1e-6
    torch.testing.assert_close(prompt.frame_features, embedding, rtol=0, atol=1e-5)


# -- vision FLOPs -------------------------------------------------------------------------------------


def test_vision_flops_counts_the_tower_and_projector(family, clip):
    from torch.utils.flop_counter import FlopCounterMode

    config = family.model.config
    vision = config.vision_config
    hf = load(family.name, attn="eager").model  # CPU SDPA's kernel escapes the counter; eager's matmuls do not
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hf.multi_modal_projector(hf.vision_tower(clip.pixels).last_hidden_state)
    patches = (vision.image_size // vision.patch_size) ** 2
    patch_embedding = FRAMES * patches * 3 * vision.patch_size ** 2 * vision.hidden_size  # not counted, as CLIP's
    assert counter.get_total_flops() // 2 - patch_embedding == family.vision_flops(clip.shape)


# -- 6. the engine on this family ----------------------------------------------------------------------


@pytest.mark.parametrize("method, prune_after", [("none", None), ("uniform", None), ("fastv", (0,))])
def test_engine_greedy_decode_equals_hf_generate(family, clip, method, prune_after):
    """vidsparse's own prefill and cached decoding (not HF's forward): `none` gives HF generate's tokens and
    first logits; a pruned run keeps the newline separator and the text, and every kept token its row's
    original position."""
    from vidsparse.decoding import generate
    from vidsparse.pruning import make_plan
    from vidsparse.stats import StageTimer

    with torch.no_grad():
        out = family.model.generate(input_ids=clip.ids, pixel_values_videos=clip.pixels[None], max_new_tokens=8,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, clip.ids.shape[1] :].tolist()
    expected = expected[: next((i for i, t in enumerate(expected) if t in family.eos_token_ids), len(expected))]
    plan = make_plan(method, 20, len(family.decoder.layers), prune_after=prune_after)
    ours = generate(family.decoder, family.lm_head, clip.prompt, 8, family.eos_token_ids, StageTimer(family.device),
                    plan)
    if method == "none":
        assert ours.decoded.token_ids == expected and len(expected) >= 4
        torch.testing.assert_close(ours.first_logits, out.logits[0][0].float(), atol=1e-4, rtol=1e-4)
        return
    head = ours.prefilled.head
    visual = clip.prompt.visual
    assert ours.prefilled.visual_per_layer[-1] == 20
    kept = visual.positions[ours.prefilled.block.origin]
    if head.stages:  # pruned before the shared layers: the head's rows are the kept ones, at their own positions
        block = head.positions[0, 0, head.block.start : head.block.end]
        assert block.tolist() == kept.tolist()
        assert head.positions[0, 0, head.block.end].item() == clip.prompt.head_length - 1  # the newline stays
