"""The pruning and decoding paths do not wait for the device (issue #38): every method's prefill and
decoding, on a tiny model of each family and with several questions decoded together, makes no
would-be host-device synchronisation (tests/sync_guard.py) beyond the reads listed here, each with
its reason."""

from __future__ import annotations

import collections

import pytest
import torch

from tests.references.test_pruning import ask_about
from tests.sync_guard import Sync, recording_syncs
from vidsparse.decoding import ClipQuestions, decode_together, generate
from vidsparse.engine import ClipPrompts, finish_question, first_logits, prefill_head, question_rows
from vidsparse.models.loading import load_model
from vidsparse.pruning import METHODS, make_plan
from vidsparse.stats import StageTimer

NEW_TOKENS = 4
# The reads that remain, by "module:function": how many per decoding step or per clip.
PER_STEP = {("tolist", "decoding.py:step")}  # the step's tokens: EOS, and the answer itself
PER_CLIP = {"fastvid": {("tolist", "pruning/fastvid.py:segment_budgets")},  # T - 1 frame similarities: the segments
            "holitom": {("tolist", "pruning/holitom.py:static_counts")},  # (T - 1) x T static-place counts: the windows
            # T - 1 frame similarities (the segments), then the trees rooted in each frame (its clusters)
            "flashvid": {("tolist", "pruning/flashvid.py:cut_segments"),
                         ("tolist", "pruning/flashvid.py:compress_clip")}}
# Once per step that ends questions (here all of them end together): how many visual keys their tokens saw (a method
# choosing keys while decoding).
PER_DECODING = {"dycoke": {("tolist", "decoding.py:_seen_totals")}}
# ToMe (an image-era baseline) merges in rounds whose survivors it reads: left as it is.
UNTOUCHED = {"tome"}


def counted(found: list[Sync]) -> collections.Counter:
    return collections.Counter((sync.operation, sync.where.rsplit(":", 1)[0]) for sync in found)


@pytest.fixture(scope="module", params=["tiny_checkpoint", "tiny_onevision", "tiny_qwen"])
def family(request, clips):
    model = load_model(str(request.getfixturevalue(request.param)))
    with torch.inference_mode():
        ask = ask_about(model, clips)
        prompts = [ask(question) for question in ("what color is the square ?", "what moves ?", "what is it ?")]
    return model, prompts


@pytest.mark.parametrize("method", sorted(set(METHODS) - UNTOUCHED))
def test_one_question_waits_only_for_its_tokens(family, method):
    model, prompts = family
    plan = make_plan(method, 20, len(model.decoder.layers))
    with recording_syncs() as found:
        generation = generate(model.decoder, model.lm_head, prompts[0], NEW_TOKENS, set(), StageTimer(model.device),
                              plan)
    steps = len(generation.decoded.token_ids)  # no EOS: every step's tokens were read
    expected = collections.Counter(dict.fromkeys(PER_STEP, steps))
    expected.update(dict.fromkeys(PER_CLIP.get(method, ()), 1))
    expected.update(dict.fromkeys(PER_DECODING.get(method, ()), 1))
    assert counted(found) == expected


@pytest.mark.parametrize("method", ["none", "fastv", "sparsevlm", "stprune", "vidcom2", "dycoke"])
def test_questions_decoded_together_wait_only_for_their_tokens(family, method):
    """A clip's questions: the shared head once, their rows in one batch, each one's own stages, and
    decoding together (the batch path of `vidsparse batch` and the server)."""
    model, prompts = family
    plan = make_plan(method, 20, len(model.decoder.layers))
    timer = StageTimer(model.device)
    with recording_syncs() as found, torch.inference_mode():
        head = prefill_head(model.decoder, prompts[0], plan, timer)
        (rows_of,) = question_rows(model.decoder, [ClipPrompts(head, prompts, plan)])
        finished = [finish_question(model.decoder, prompt, plan, timer, head, rows)
                    for prompt, rows in zip(prompts, rows_of, strict=True)]
        logits = first_logits(model.decoder, model.lm_head, [hidden for _, _, hidden in finished])
        clip = ClipQuestions(plan, [p for p, _, _ in finished], [cache for _, cache, _ in finished], logits, NEW_TOKENS)
        decoded = decode_together(model.decoder, model.lm_head, [clip], set(), model.device)
    assert all(len(d.token_ids) == NEW_TOKENS for d in decoded)
    expected = collections.Counter(dict.fromkeys(PER_STEP, NEW_TOKENS))
    expected.update(dict.fromkeys(PER_DECODING.get(method, ()), 1))
    assert counted(found) == expected


def test_the_guard_sees_conversions_and_data_sized_results_in_watched_modules_only():
    """The instrument itself: a line compiled as if in a watched module is caught, the same line
    elsewhere is not."""
    import vidsparse.stage

    code = ("int(t.sum()); t[t > 0]; t.nonzero(); torch.where(t > 1); t.tolist(); t.to('cpu'); "
            "torch.tensor([1], device='cpu'); t.to(torch.float16)")
    watched = compile(code, vidsparse.stage.__file__, "exec")
    elsewhere = compile(code, __file__, "exec")
    t = torch.arange(4)
    with recording_syncs() as found:
        exec(watched, {"t": t, "torch": torch})
        exec(elsewhere, {"t": t, "torch": torch})
    assert [sync.operation for sync in found] == ["__int__", "__getitem__", "nonzero", "where", "tolist", "to",
                                                  "tensor"]  # a dtype change is no move
    assert all(sync.where.startswith("stage.py:<module>:") for sync in found)
