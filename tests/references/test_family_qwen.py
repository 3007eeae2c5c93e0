"""The Qwen2.5-VL family against transformers' own Qwen2.5-VL: pixels against the Qwen2-VL image
processor, prompt against the checkpoint's chat template, embeddings / positions / logits against
HF's forward and get_rope_index, saliency against an eager recomputation, FLOPs against torch's
FLOP counter. A tiny random checkpoint is saved and loaded the way users' checkpoints are."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from lab.tiny_qwen import save_tiny_qwen
from tests.conftest import WORDS, moving_square_frames
from vidsparse.errors import UserError
from vidsparse.models.family import ClipShape
from vidsparse.models.qwen2_5_vl import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, Qwen25VL, smart_resize
from vidsparse.preprocess import CLIP_MEAN, CLIP_STD

# chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct (the same as Qwen2-VL-*-Instruct's).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QUESTION = "what color is the square ?"


def clips() -> list[tuple[str, np.ndarray, float | None]]:
    """(name, frames, sampled fps): an even clip at HF's default timing; an odd, non-square one sampled
    so sparsely that its temporal positions outrun its rows and columns; a square one whose seconds per
    span are fractional."""
    rng = np.random.default_rng(0)
    return [
        ("even", moving_square_frames(4, 48, 64), None),
        ("odd-wide-sparse", rng.integers(0, 256, (5, 40, 90, 3), dtype=np.uint8), 0.25),
        ("odd-square-fractional", moving_square_frames(3, 60, 60), 3.0),
    ]


CLIPS = clips()
IDS = [name for name, _, _ in CLIPS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"), words=WORDS)


@pytest.fixture(scope="module")
def family(checkpoint) -> Qwen25VL:
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return Qwen25VL(model, AutoTokenizer.from_pretrained(checkpoint), "tiny", CLIP_MEAN, CLIP_STD)


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="eager").eval()


def hf_inputs(family: Qwen25VL, ids: torch.Tensor, pixels: torch.Tensor, fps: float | None) -> dict:
    """What Qwen2_5_VLProcessor hands the model for this prompt and clip: flat patches, the grid in
    patches, the token types (video = 2) and the seconds per temporal patch (a float32 tensor)."""
    grid = [[int(pixels.shape[0]), int(pixels.shape[1]) * 2, int(pixels.shape[2]) * 2]]
    inputs = {"input_ids": ids, "pixel_values_videos": pixels.reshape(-1, pixels.shape[-1]),
              "video_grid_thw": torch.tensor(grid),
              "mm_token_type_ids": (ids == family.model.config.video_token_id).int() * 2}
    if fps is not None:
        inputs["second_per_grid_ts"] = torch.tensor([2 / fps])
    return inputs


def prompt_for(family: Qwen25VL, frames: np.ndarray, fps: float | None, saliency: bool = False):
    clip = ClipShape(*frames.shape[:3], fps)
    pixels = family.preprocess(frames)
    ids = family.prompt_ids(QUESTION, clip)
    prompt = family.embed(ids, family.video_features(pixels, saliency=saliency), clip)
    return clip, pixels, ids, prompt


# -- pixels ----------------------------------------------------------------------------------------


def test_smart_resize_matches_hf():
    for height in (1, 13, 28, 40, 48, 100, 333, 480, 720, 1080, 2160):
        for width in (14, 56, 90, 64, 640, 1280, 1920, 3840):
            if max(height, width) / min(height, width) > 200:
                continue
            for bounds in ((VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (3136, 12845056), (56 * 56, 28 * 28 * 1280)):
                assert smart_resize(height, width, 28, *bounds) == hf_smart_resize(height, width, 28, *bounds)
    with pytest.raises(UserError, match="elongated"):
        smart_resize(10, 2010, 28, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)


@pytest.mark.parametrize("name,frames,fps", CLIPS, ids=IDS)
def test_pixels_match_hf_image_processor(family, name, frames, fps):
    """Each frame through Qwen2VLImageProcessorPil (the video processor's resize, normalisation and
    merge-window patch order, one frame repeated over the temporal patch) against the same frame's
    temporal slot in our patches; an odd clip's padding slot holds the last frame again."""
    processor = Qwen2VLImageProcessorPil(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, patch_size=14,
                                         merge_size=2, temporal_patch_size=2)
    pixels = family.preprocess(frames)
    spans = pixels.shape[0]
    assert spans == math.ceil(len(frames) / 2)
    flat = pixels.reshape(spans, -1, 3, 2, 14, 14)
    assert family.frame_size(*frames.shape[1:3]) == (pixels.shape[1] * 28, pixels.shape[2] * 28)
    differences = []
    for slot in range(2 * spans):
        out = processor(images=[Image.fromarray(frames[min(slot, len(frames) - 1)])], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, pixels.shape[1] * 2, pixels.shape[2] * 2]]
        reference = out["pixel_values"].view(-1, 3, 2, 14, 14)[:, :, 0]
        differences.append((flat[slot // 2, :, :, slot % 2] - reference).abs())
    difference = torch.stack(differences)
    # PIL rounds to uint8 after each resampling pass as resize_frames does; what differs is float
    # summation order deciding a rounding: a level or two of 255 on a few pixels (measured 1e-4 mean).
    assert difference.mean() < 5e-4, difference.mean()
    assert difference.max() < 3 / 255 / min(CLIP_STD)


def test_patch_order_is_sensitive(family):
    """The pixel comparison above fails for a transposed patch layout: our own pixels, with two merge
    positions swapped, are far from the processor's."""
    frames = moving_square_frames(2, 48, 64)
    processor = Qwen2VLImageProcessorPil(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    reference = processor(images=[Image.fromarray(frames[0])], return_tensors="pt")["pixel_values"]
    swapped = family.preprocess(frames)[:, :, :, [0, 2, 1, 3]].reshape(reference.shape[0], -1)
    assert (swapped.view(-1, 3, 2, 196)[:, :, 0] - reference.view(-1, 3, 2, 196)[:, :, 0]).abs().mean() > 0.05


# -- prompt ----------------------------------------------------------------------------------------


def test_prompt_matches_chat_template(family):
    clip = ClipShape(5, 40, 90)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = family.tokenizer.apply_chat_template(messages, chat_template=QWEN_CHAT_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    n_visual = family.visual_tokens(clip)
    assert n_visual == 3 * 8 * 17  # 224 x 476 pixels -> 16 x 34 patches -> 8 x 17 tokens, 5 frames -> 3 spans
    expected = family.tokenizer(text.replace("<|video_pad|>", "<|video_pad|>" * n_visual),
                                add_special_tokens=False).input_ids
    assert family.prompt_ids(QUESTION, clip)[0].tolist() == expected
    with pytest.raises(UserError, match="special token"):
        family.prompt_ids("what is <|vision_end|> here ?", clip)


# -- embeddings, positions, logits -----------------------------------------------------------------


@pytest.mark.parametrize("name,frames,fps", CLIPS, ids=IDS)
def test_embeds_and_positions_match_hf_forward(family, name, frames, fps):
    """HF's forward from input_ids + pixels builds inputs_embeds and 3-D position ids for its text
    model: ours equal them (float32 1e-5, positions exactly); get_rope_index directly agrees."""
    clip, pixels, ids, prompt = prompt_for(family, frames, fps)
    seen = {}
    hook = family.decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs),
                                                    with_kwargs=True)
    try:
        with torch.no_grad():
            family.model(**hf_inputs(family, ids, pixels, fps))
    finally:
        hook.remove()
    torch.testing.assert_close(prompt.embeds, seen["inputs_embeds"], rtol=0, atol=1e-5)
    assert torch.equal(prompt.rope_positions, seen["position_ids"])
    inputs = hf_inputs(family, ids, pixels, fps)
    positions, deltas = family.model.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs.get("second_per_grid_ts"))
    assert prompt.rope_positions.shape == (3, 1, ids.shape[1])
    assert torch.equal(prompt.rope_positions, positions)
    assert int(deltas) == int(positions.max()) + 1 - ids.shape[1]  # decoding goes on at the prompt's max + 1


@pytest.mark.parametrize("name,frames,fps", CLIPS, ids=IDS)
def test_logits_from_our_embeds_and_positions_match_hf(family, name, frames, fps):
    _, pixels, ids, prompt = prompt_for(family, frames, fps)
    with torch.no_grad():
        hf = family.model(**hf_inputs(family, ids, pixels, fps)).logits
        ours = family.model(inputs_embeds=prompt.embeds, position_ids=prompt.rope_positions).logits
        plain = family.model(inputs_embeds=prompt.embeds).logits  # 1-D positions 0..n-1: must differ
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-4)
    assert (plain - hf).abs().max() > 1e-2


@pytest.mark.parametrize("name,frames,fps", CLIPS, ids=IDS)
def test_visual_map_and_head(family, name, frames, fps):
    clip, pixels, ids, prompt = prompt_for(family, frames, fps)
    spans, rows, cols = pixels.shape[:3]
    visual = prompt.visual
    video_id = family.model.config.video_token_id
    assert len(visual) == spans * rows * cols == family.visual_tokens(clip)
    assert torch.equal(visual.positions, (ids[0] == video_id).nonzero().squeeze(1))
    assert visual.frames_per_span == 2 and not visual.is_cls.any()
    # Each token's (t, h, w) position is its (span, row, col) in HF's layout: the map says the same.
    start = int(visual.positions[0])
    video_positions = prompt.rope_positions[:, 0, visual.positions] - start
    assert torch.equal(video_positions[1], visual.row) and torch.equal(video_positions[2], visual.col)
    assert torch.equal(video_positions[0].unique(return_inverse=True)[1], visual.frame)
    # The head ends with the last <|video_pad|>; <|vision_end|> opens the text after it.
    assert prompt.head_length == int(visual.positions[-1]) + 1
    assert family.tokenizer.convert_ids_to_tokens(int(ids[0, prompt.head_length])) == "<|vision_end|>"
    assert prompt.suffix_words[:2] == ["<|vision_end|>", "what"]
    # HF 5.25: the text after the video starts at start + max(rows, cols) in all three dimensions,
    # whatever the temporal positions reach (the sparse clip's reach beyond it).
    after = prompt.rope_positions[:, 0, prompt.head_length]
    assert after.tolist() == [start + max(rows, cols)] * 3


def test_embed_fps_moves_only_time(family):
    frames = moving_square_frames(6, 48, 64)
    _, _, _, slow = prompt_for(family, frames, 0.5)
    _, _, _, default = prompt_for(family, frames, None)
    positions = slow.visual.positions
    t_slow = slow.rope_positions[0, 0, positions] - int(positions[0])
    t_default = default.rope_positions[0, 0, positions] - int(positions[0])
    assert torch.equal(t_default, slow.visual.frame * 2)  # 1 s a span, tokens_per_second 2
    assert torch.equal(t_slow, slow.visual.frame * 8)  # 2 frames at 0.5 fps = 4 s a span
    assert torch.equal(slow.rope_positions[1:], default.rope_positions[1:])


# -- saliency --------------------------------------------------------------------------------------


def window_order(rows: int, cols: int, side: int) -> list[int]:
    """Raster indices of a span's merged tokens in the order the ViT's window attention visits them:
    windows of side x side tokens in raster order, tokens in raster order inside each."""
    return [r * cols + c for wr in range(0, rows, side) for wc in range(0, cols, side)
            for r in range(wr, min(wr + side, rows)) for c in range(wc, min(wc + side, cols))]


@pytest.mark.parametrize("name,frames,fps", CLIPS[:2], ids=IDS[:2])
def test_saliency_matches_eager_attention(family, eager_model, monkeypatch, name, frames, fps):
    """HF's own eager attention probabilities of the last full-attention block, recorded as the tower
    runs, reduced the documented way (mean over heads and queries, summed per merged token) and put
    in raster order by the window layout, equal our saliency at each token's (span, row, col)."""
    _, pixels, _, prompt = prompt_for(family, frames, fps, saliency=True)
    visual = eager_model.model.visual
    target = visual.blocks[max(visual.fullatt_block_indexes)].attn
    recorded = []
    original = modeling_qwen2_5_vl.eager_attention_forward

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        output, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is target:
            recorded.append(weights[0].float())
        return output, weights

    monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", recording)
    spans, rows, cols = pixels.shape[:3]
    grid = torch.tensor([[spans, rows * 2, cols * 2]])
    with torch.no_grad():
        out = visual(pixels.reshape(-1, pixels.shape[-1]), grid_thw=grid)
    assert len(recorded) == spans  # full attention: one segment a span
    side = visual.window_size // 2 // visual.patch_size
    order = torch.tensor(window_order(rows, cols, side))
    reference = torch.zeros(spans, rows * cols)
    for span, weights in enumerate(recorded):
        received = weights.mean(0).mean(0).view(-1, 4).sum(1)  # per merged token, window order
        reference[span, order] = received
    expected = reference.view(spans, rows, cols)[prompt.visual.frame, prompt.visual.row, prompt.visual.col]
    torch.testing.assert_close(prompt.saliency, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(prompt.saliency.view(spans, -1).sum(1), torch.ones(spans))
    assert prompt.saliency.std() > 0  # not uniform: the test can tell a wrong layout
    frame_reference = visual.merger.ln_q(out.last_hidden_state).view(spans, -1, visual.config.hidden_size).mean(1)
    torch.testing.assert_close(prompt.frame_features, frame_reference, rtol=1e-4, atol=1e-5)
    # Saliency does not change the tokens.
    plain = family.video_features(pixels)
    torch.testing.assert_close(family.video_features(pixels, saliency=True).tokens, plain.tokens, rtol=0, atol=0)


# -- cost and config -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,frames,fps", CLIPS, ids=IDS)
def test_vision_flops_match_flop_counter(family, eager_model, name, frames, fps):
    """torch's FLOP counter on HF's tower (eager attention: its matmuls counted) counts 2 a multiply-add."""
    clip = ClipShape(*frames.shape[:3])
    pixels = family.preprocess(frames)
    grid = torch.tensor([[pixels.shape[0], pixels.shape[1] * 2, pixels.shape[2] * 2]])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        eager_model.model.visual(pixels.reshape(-1, pixels.shape[-1]), grid_thw=grid)
    assert family.vision_flops(clip) * 2 == counter.get_total_flops()


def test_check_config(family):
    config = family.model.config
    assert Qwen25VL.check_config(config) == []
    text = config.text_config
    try:
        text.layer_types = ["full_attention", "sliding_attention"]
        assert any("sliding-window" in p for p in Qwen25VL.check_config(config))
    finally:
        text.layer_types = ["full_attention"] * text.num_hidden_layers
    assert Qwen25VL.placeholder(config) == ("<|video_pad|>", family.tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    assert family.tokenizer.convert_tokens_to_ids("<|im_end|>") in family.eos_token_ids


def test_decoder_facts_the_engine_relies_on(family):
    """The text decoder is model.model.language_model; its rotary_emb takes (3, batch, n) positions and
    returns cos/sin (batch, n, head_dim) with the t/h/w sections already combined (mrope_section), 1-D
    positions (batch, n) meaning the same position in all three; the layers apply the standard
    rotate-half RoPE on them; HF continues decoding at the prompt's largest position + 1."""
    decoder = family.decoder
    assert decoder is family.model.model.language_model and family.lm_head is family.model.lm_head
    frames = moving_square_frames(5, 40, 90)
    _, pixels, ids, prompt = prompt_for(family, frames, 0.25)
    hidden = prompt.embeds
    cos, sin = decoder.rotary_emb(hidden, prompt.rope_positions)
    head_dim = family.text_config.hidden_size // family.text_config.num_attention_heads
    assert cos.shape == sin.shape == (1, ids.shape[1], head_dim)
    # Combined by hand: frequency i of the first half takes its angle from dimension t, h or w by section.
    inv_freq = decoder.rotary_emb.inv_freq
    section = family.text_config.rope_parameters["mrope_section"]
    which = torch.cat([torch.full((n,), k) for k, n in enumerate(section)])
    chosen = prompt.rope_positions[which, 0].T.float()  # (n, head_dim / 2)
    torch.testing.assert_close(cos[0], torch.cat([(chosen * inv_freq).cos()] * 2, -1))
    flat = torch.arange(ids.shape[1])[None]
    one_d, three_d = decoder.rotary_emb(hidden, flat), decoder.rotary_emb(hidden, flat.expand(3, 1, -1))
    torch.testing.assert_close(one_d, three_d)
    # Running the layers by hand on (embeds, those cos/sin) gives HF's logits: nothing else enters.
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        x = hidden
        for layer in decoder.layers:
            assert layer.self_attn.sliding_window is None
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        ours = family.lm_head(decoder.norm(x))
        hf = family.model(**hf_inputs(family, ids, pixels, 0.25))
        torch.testing.assert_close(ours, hf.logits, rtol=0, atol=1e-4)
        # One decoding step through HF's cache: its position is the prompt's max + 1 in all three.
        step_ids = hf.logits[:, -1:].argmax(-1)
        seen = {}
        hook = decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
        try:
            family.model(input_ids=step_ids, cache=hf.cache, use_cache=True)
        finally:
            hook.remove()
    assert seen["position_ids"].flatten().tolist() == [int(prompt.rope_positions.max()) + 1] * 3


# -- the engine on this family ------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [None, 0.25])
def test_engine_greedy_decode_equals_hf_generate(family, fps):
    """vidsparse's own prefill and cached decoding with 3-D positions give HF generate's tokens and first
    logits, at HF's default timing and at a sparse one where the video's time positions outrun the
    text's start (decoding continues after the prompt's largest position, HF's rope_deltas)."""
    from vidsparse.decoding import generate
    from vidsparse.stats import StageTimer

    frames = moving_square_frames(5, 40, 90)
    clip, pixels, ids, prompt = prompt_for(family, frames, fps)
    assert (prompt.rope_positions.max() + 1 > prompt.text_start + ids.shape[1] - prompt.head_length) == (fps == 0.25)
    with torch.no_grad():
        out = family.model.generate(**hf_inputs(family, ids, pixels, fps), max_new_tokens=8, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, ids.shape[1] :].tolist()
    expected = expected[: next((i for i, t in enumerate(expected) if t in family.eos_token_ids), len(expected))]
    ours = generate(family.decoder, family.lm_head, prompt, 8, family.eos_token_ids, StageTimer(family.device))
    assert ours.decoded.token_ids == expected and len(expected) >= 4
    torch.testing.assert_close(ours.first_logits, out.logits[0][0].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["uniform", "vidcom2", "tome"])
def test_kept_tokens_keep_their_3d_positions(family, method):
    """Pruned before the first layer, the head holds each kept token (a merged one: its anchor) at the
    3-D position HF's get_rope_index gives that row of the full prompt, and the question's rows start
    where they do unpruned."""
    from vidsparse.engine import prefill_head
    from vidsparse.pruning import make_plan
    from vidsparse.stats import StageTimer

    _, pixels, ids, prompt = prompt_for(family, moving_square_frames(5, 40, 90), 0.25, saliency=True)
    inputs = hf_inputs(family, ids, pixels, 0.25)
    hf_positions, _ = family.model.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"])
    head = prefill_head(family.decoder, prompt, make_plan(method, 30, len(family.decoder.layers)),
                        StageTimer(family.device))
    block = head.block
    assert block.size == 30 and head.stages
    rows = prompt.visual.positions[block.origin]
    assert torch.equal(head.positions[:, 0, block.start : block.end], hf_positions[:, 0, rows])
    assert head.text_start == int(hf_positions[0, 0, prompt.head_length])


@pytest.mark.parametrize("name,frames,fps", CLIPS, ids=IDS)
def test_hf_video_inputs_are_what_the_processor_hands_the_model(family, name, frames, fps):
    """What training and the held-out evaluation feed HF's model for a batch of two clips equals the
    processor's inputs above, clip by clip (patches, grids, token types, seconds a patch)."""
    clip, pixels, ids, _ = prompt_for(family, frames, fps)
    ours = family.hf_video_inputs(torch.stack([pixels, pixels]), torch.cat([ids, ids]), clip)
    one = hf_inputs(family, ids, pixels, fps)
    assert torch.equal(ours["pixel_values_videos"], torch.cat([one["pixel_values_videos"]] * 2))
    assert torch.equal(ours["video_grid_thw"], torch.cat([one["video_grid_thw"]] * 2))
    assert torch.equal(ours["mm_token_type_ids"], torch.cat([one["mm_token_type_ids"]] * 2))
    if fps is None:
        assert "second_per_grid_ts" not in ours
    else:
        torch.testing.assert_close(ours["second_per_grid_ts"], torch.cat([one["second_per_grid_ts"]] * 2))
