"""Decoding takes a question's own keys and values over: once its buffers hold them, the prefill's
cache is let go (no second copy of every question's cache while a clip's questions decode)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vidsparse import decoding, pipeline
from vidsparse.decoding import generate
from vidsparse.models.family import ClipShape
from vidsparse.models.video_llava import VideoLlava
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA
from vidsparse.preprocess import preprocess_frames
from vidsparse.stats import StageTimer
from vidsparse.video import decode_video


def caches_alive_at_each_step(monkeypatch, module, name: str) -> list[int]:
    """Wrap `module.name` (a function returning (prefilled, cache, ...)) to track each cache it returns,
    and count, at every decoding step, how many of them are still alive."""
    refs, alive = [], []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        refs.append(weakref.ref(out[1]))
        return out

    step = decoding.DecodeState.step

    def counting(self, tokens):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))
        return step(self, tokens)

    monkeypatch.setattr(module, name, recording)
    monkeypatch.setattr(decoding.DecodeState, "step", counting)
    return alive


@pytest.mark.parametrize("method", ["none", "sparsevlm"])
def test_generate_lets_go_of_the_prefill_cache(tiny_checkpoint, clips, monkeypatch, method):
    from vidsparse.pruning import make_plan

    model = VideoLlava.from_pretrained(str(tiny_checkpoint))
    pixels = preprocess_frames(decode_video(clips["h264"], 8).frames, model.image_size)
    with torch.inference_mode():
        clip = ClipShape(8, 48, 64)
        prompt = model.embed(model.prompt_ids("what color is the square ?", clip), model.video_features(pixels), clip)
    alive = caches_alive_at_each_step(monkeypatch, decoding, "prefill_question")
    generate(model.decoder, model.lm_head, prompt, 4, set(), StageTimer(model.device), make_plan(method, 20, 4))
    assert alive and alive == [0] * len(alive)


def test_a_clips_questions_let_go_of_their_prefill_caches(tiny_checkpoint, clips, monkeypatch):
    qa = VideoQA.from_pretrained(str(tiny_checkpoint), dtype="float32", device="cpu")
    alive = caches_alive_at_each_step(monkeypatch, pipeline, "finish_question")
    questions = ["what color is the square ?", "what moves ?", "what is happening ?"]
    results = list(qa.answer_clip(decode_video(clips["h264"], 8), questions, ask_options("sparsevlm", 20,
                                                                                             max_new_tokens=4)))
    assert len(results) == 3 and alive and alive == [0] * len(alive)


def test_a_question_the_hook_ends_stops_there_and_the_others_decode_as_without_it(tiny_checkpoint, clips):
    """Three questions decoded together; the hook sees every token of each, in order, and ends the
    second one at its second token: that one's answer is the first two tokens of its full answer (one
    token fed back), the other two are their full answers."""
    qa = VideoQA.from_pretrained(str(tiny_checkpoint), dtype="float32", device="cpu")
    video = decode_video(clips["h264"], 8)
    questions = ["what color is the square ?", "what moves ?", "what is happening ?"]
    options = ask_options("sparsevlm", 20, max_new_tokens=6)
    full = [r.to_dict() for r in qa.answer_clip(video, questions, options)]
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def hook(question: int, token: int) -> bool:
        seen[question].append(token)
        return not (question == 1 and len(seen[1]) == 2)

    clip = qa.prepare_clip(video, questions[0], options).asked(3)
    ended = [r.to_dict() for r in qa.answer_prepared(clip, questions, on_token=hook)]
    assert all(len(seen[i]) == full[i]["tokens"]["generated"] for i in (0, 2)) and len(seen[1]) == 2
    assert full[1]["tokens"]["generated"] > 2  # it would have gone on
    assert [r["answer"] for r in ended[::2]] == [r["answer"] for r in full[::2]]
    assert ended[1]["tokens"]["generated"] == 2
    assert ended[1]["answer"] == qa.model.decode_text(seen[1]) and full[1]["answer"].startswith(ended[1]["answer"])
