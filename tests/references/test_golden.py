"""Behaviour kept across reshaping: every method at two budgets on both shipped models answers, keeps
tokens and counts FLOPs exactly as the version before the product/lab split did (records saved by
`python -m tests.golden` at commit f97a63a, on the clips in tests/data/golden)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.golden import records

SAVED = Path(__file__).resolve().parents[1] / "data" / "golden.json"


def test_answers_tokens_and_flops_are_those_of_the_earlier_version():
    saved = json.loads(SAVED.read_text())
    now = records()
    assert len(now) == len(saved) == 168
    for before, after in zip(saved, now, strict=True):
        assert after == before, f"{before['model']} {before['method']} {before['budget']} on {before['video']}"
