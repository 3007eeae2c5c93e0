"""Records of answers, kept tokens and FLOPs from an earlier version, for `test_golden.py`: the code
may be moved and reshaped (product and lab, an engine that returns values), never its behaviour.
Positions are `keep`, as every method's were when the records were saved (the default became each
method's authors' numbering later).

    python -m tests.golden tests/data/golden.json tests/data/golden_batched.json  # this version's records

Uses only the Python API both versions have (`VideoQA`, `ask_options`), on clips kept in tests/data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "golden"
MODELS = {"shapes-demo": "demo", "shapes-hd": "hd"}
# The methods the records were saved for (a method added since has its own references).
METHODS = ("none", "random", "uniform", "fastv", "pdrop", "tome", "sparsevlm", "vidcom2", "fastvid", "dycoke-prefill",
           "stprune")
BUDGETS = ("10%", "25%")


def records() -> list[dict]:
    """Every method at each budget, on each shipped model's clips and questions."""
    from vidsparse.options import ask_options
    from vidsparse.pipeline import VideoQA
    from vidsparse.video import decode_video

    rows = []
    for model, folder in MODELS.items():
        qa = VideoQA.from_pretrained(model, dtype="float32", device="cpu")
        for line in (DATA / folder / "qa.jsonl").read_text().splitlines():
            item = json.loads(line)
            video = decode_video(DATA / folder / item["video"], 8)
            for method in METHODS:
                for budget in BUDGETS if method != "none" else ("100%",):
                    options = ask_options(method, budget, positions="keep", max_new_tokens=8)
                    result = qa.answer(video, item["question"], options)
                    stats = result.to_dict()
                    rows.append({"model": model, "video": item["video"], "question": item["question"],
                                 "method": method, "budget": budget, "answer": stats["answer"],
                                 "visual_per_stage": stats["pruning"]["visual_per_stage"],
                                 "tokens": stats["tokens"], "prefill_flops": stats["flops"]["prefill"]})
    return rows


def batched_records() -> list[dict]:
    """A clip's questions answered together (`VideoQA.answer_clip`: one shared head, one plan, decoded
    two at a time), every method at 20%, on each shipped model: every question of its clips about
    every clip. Each record is `--json`'s, less what is measured (times, memory) and where the clip is."""
    from vidsparse.options import ask_options
    from vidsparse.pipeline import VideoQA
    from vidsparse.video import decode_video

    rows = []
    for model, folder in MODELS.items():
        qa = VideoQA.from_pretrained(model, dtype="float32", device="cpu")
        items = [json.loads(line) for line in (DATA / folder / "qa.jsonl").read_text().splitlines()]
        questions = [item["question"] for item in items]
        for item in items:
            video = decode_video(DATA / folder / item["video"], 8)
            for method in METHODS:
                options = ask_options(method, "20%", positions="keep", max_new_tokens=8)
                for question, result in zip(questions, qa.answer_clip(video, questions, options, decode_batch=2),
                                            strict=True):
                    stats = result.to_dict()
                    for measured in ("time_ms", "memory", "decode_tokens_per_s", "video", "model"):
                        stats.pop(measured, None)
                    stats["shared"].pop("time_ms", None)
                    rows.append({"model": model, "clip": item["video"], "question": question, "method": method}
                                | stats)
    return rows


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(records(), indent=0) + "\n")
    Path(sys.argv[2]).write_text(json.dumps(batched_records(), indent=0) + "\n")
