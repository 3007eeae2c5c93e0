"""Behaviour kept across reshaping: every method on both shipped models answers, keeps tokens and
counts FLOPs exactly as the version before the product/lab split and the engine's rewrite did
(records saved by `python -m tests.golden` at commit f97a63a, on the clips in tests/data/golden):
one question at a time, and a clip's questions answered together (shared head, batched decoding).
One record was re-saved on purpose since: FastVID's context share became the official int() (issue
#39), which changed one answer at 10% on shapes-demo. DyCoke's records are its prefill-time stand-in's,
renamed `dycoke-prefill` when `dycoke` became the authors' decode-time pruning (issue #39)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden import batched_records, records

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("saved, answer_now, count", [("golden.json", records, 168),
                                                      ("golden_batched.json", batched_records, 352)],
                         ids=["one question at a time", "a clip's questions together"])
def test_answers_tokens_and_flops_are_those_of_the_earlier_version(saved, answer_now, count):
    before_all = json.loads((DATA / saved).read_text())
    now = answer_now()
    assert len(now) == len(before_all) == count
    for before, after in zip(before_all, now, strict=True):
        assert after == before, {key: before[key] for key in ("model", "method", "question") if key in before}
