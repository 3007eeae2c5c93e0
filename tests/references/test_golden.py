"""Behaviour kept across reshaping: every method on both shipped models answers, keeps tokens and
counts FLOPs exactly as the version before the product/lab split and the engine's rewrite did
(records saved by `python -m tests.golden` at commit f97a63a, on the clips in tests/data/golden):
one question at a time, and a clip's questions answered together (shared head, batched decoding)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.golden import batched_records, records

DATA = Path(__file__).resolve().parents[1] / "data"


def test_answers_tokens_and_flops_are_those_of_the_earlier_version():
    saved = json.loads((DATA / "golden.json").read_text())
    now = records()
    assert len(now) == len(saved) == 168
    for before, after in zip(saved, now, strict=True):
        assert after == before, f"{before['model']} {before['method']} {before['budget']} on {before['video']}"


def test_a_clips_questions_together_are_answered_as_the_earlier_version_did():
    saved = json.loads((DATA / "golden_batched.json").read_text())
    now = batched_records()
    assert len(now) == len(saved) == 352
    for before, after in zip(saved, now, strict=True):
        assert after == before, f"{before['model']} {before['method']} on {before['clip']}: {before['question']}"
