"""`batch` at scale: the questions file and the results file are read a line at a time (memory does not
grow with either), the lock comes before anything slow, and a mistake found mid-file keeps what was
answered."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
from typer.testing import CliRunner

from tests.unit.test_batch import HEADER, SETTINGS, read_results
from vidsparse import batch
from vidsparse.cli import app
from vidsparse.errors import UserError
from vidsparse.metrics import summarize
from vidsparse.questions import QuestionSource
from vidsparse.results import ResultsFile

runner = CliRunner()
PADDING = "x" * 4000  # 4 kB a line: 5000 lines are 20 MB


def peak_bytes_while(work) -> int:
    """The most memory Python allocated while `work()` ran."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_questions_file_is_read_as_it_is_asked(folder, tmp_path):
    """20 MB of questions: iterating them holds the ids, not the file or the questions (a list of them
    took 1.46 GB for a million)."""
    path = tmp_path / "qa.jsonl"
    with path.open("w") as f:
        for i in range(5000):
            f.write(json.dumps({"video": "a.mp4", "question": f"what {PADDING} ?", "id": i}) + "\n")
    source = QuestionSource(folder, path, None)
    assert source.count() == 5000
    peak = peak_bytes_while(lambda: sum(1 for _ in source))
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MB to read a 20 MB file"
    assert len(source.ids) == 5000


def test_a_mistake_in_the_file_is_found_when_its_line_is_read(folder, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"video": "a.mp4", "question": "q1"}\n{"video": "a.mp4", "question": "q2"}\nnot json\n')
    read = []
    with pytest.raises(UserError, match="line 3: not valid JSON"):
        for q in QuestionSource(folder, path, None):
            read.append(q.question)
    assert read == ["q1", "q2"]


def test_resuming_indexes_the_results_not_holds_them(tmp_path):
    """A 20 MB results file is resumed with an index of its ids (a 300k-record file took 3.6 GB when
    every record was held)."""
    path = tmp_path / "r.jsonl"
    with path.open("w") as f:
        f.write(HEADER)
        for i in range(5000):
            f.write(json.dumps({"id": str(i), "video": "a.mp4", "question": "q", "answer": PADDING,
                                "correct": i % 2 == 0}) + "\n")

    def resume():
        with ResultsFile.open(path, SETTINGS) as results:
            assert len(results.index) == 5000 and results.is_done("4999")
            assert results.record(results.index["7"])["correct"] is False

    peak = peak_bytes_while(resume)
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MB to resume a 20 MB file"


def test_a_retried_error_is_superseded_in_the_summary(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(HEADER + '{"id": "1", "error": "gone", "correct": null}\n{"id": "2", "correct": false}\n')
    with ResultsFile.open(path, SETTINGS, retry_errors=True) as results:
        assert not results.is_done("1") and results.is_done("2")
        results.append({"id": "1", "correct": True, "tokens": {"equivalent_visual": 3}, "flops": {"prefill": 5}})
        latest = list(results.latest_records({"1", "2"}))
    assert [r["id"] for r in latest] == ["2", "1"] and "error" not in latest[1]
    assert [r["id"] for r in ResultsFile.open(path, SETTINGS).latest_records({"1"})] == ["1"]


def test_the_progress_and_summary_count_each_question_once(folder, tmp_path, tiny_checkpoint):
    """The summary of a resumed run (running totals, the results file read once at the end) equals one
    computed from the file's last record per id, written here from the file itself."""
    out = tmp_path / "r.jsonl"
    args = ["batch", str(folder), "--questions", str(folder / "qa.jsonl"), "--out", str(out), "--model",
            str(tiny_checkpoint), "--max-new-tokens", "1"]
    half = tmp_path / "half.jsonl"
    half.write_text("".join((folder / "qa.jsonl").read_text().splitlines(keepends=True)[:6]))
    # The first six questions of the same file (so the same ids), then the whole file: a resume.
    assert runner.invoke(app, [*args[:3], str(half), *args[4:]]).exit_code == 0
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 1, resumed.output  # broken.mp4
    _, records = read_results(out)
    latest = {r["id"]: r for r in records}
    summary = json.loads(out.with_name("r.summary.json").read_text())
    expected = summarize(latest.values())
    assert {k: summary[k] for k in expected} == expected and summary["questions"] == 13


def test_a_mistake_found_mid_run_keeps_the_answers_and_resumes(folder, tmp_path, tiny_checkpoint, monkeypatch):
    """Questions are read a window ahead of the answers; a bad line past the window stops the run there,
    saying what is kept, and the same command resumes once it is fixed."""
    monkeypatch.setattr(batch, "clip_jobs", functools.partial(batch.clip_jobs, window=1))
    questions, out = tmp_path / "qa.jsonl", tmp_path / "r.jsonl"
    good = (folder / "qa.jsonl").read_text().splitlines()[:4]
    questions.write_text("\n".join([*good[:3], "{not json", good[3]]) + "\n")
    args = ["batch", str(folder), "--questions", str(questions), "--out", str(out), "--model", str(tiny_checkpoint),
            "--max-new-tokens", "1"]
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 2 and "line 4: not valid JSON" in stopped.stderr, stopped.output
    kept = len(read_results(out)[1])  # the three questions before it: their clip is answered before it stops
    assert kept == 3 and f"the {kept} record(s) of this run are kept in {out}" in stopped.stderr
    questions.write_text("\n".join(good) + "\n")
    assert runner.invoke(app, args).exit_code == 0
    assert sorted(r["question"] for r in read_results(out)[1]) == sorted(json.loads(g)["question"] for g in good)


def test_a_second_run_is_refused_before_torch_or_the_questions_are_loaded(folder, tmp_path):
    """The lock comes first: a second run on a locked --out answers in one line without importing torch
    or Ray (seconds, more under load) or hashing the weights."""
    out = tmp_path / "r.jsonl"
    script = textwrap.dedent(f"""
        import sys
        from vidsparse.cli import main
        sys.argv = ["vidsparse", "batch", {str(folder)!r}, "--questions", {str(folder / "qa.jsonl")!r},
                    "--out", {str(out)!r}, "--model", "shapes-demo", "--method", "sparsevlm"]
        try:
            main()
        except SystemExit as e:
            print("exit", e.code, "torch" in sys.modules, "ray" in sys.modules)
    """)
    with ResultsFile.open(out, SETTINGS):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "200"}, check=False)
    assert "another vidsparse batch" in done.stderr, done.stderr
    assert done.stdout.split() == ["exit", "2", "False", "False"]


def test_a_resumed_runs_rate_leaves_out_the_questions_it_skips(folder, tmp_path):
    """questions_per_s_this_run divides by the time spent answering: reading and checking the questions
    recorded before is counted apart (seconds for a 300k-record resume)."""
    from vidsparse.batch import unanswered
    from vidsparse.metrics import Tally

    source = QuestionSource(folder, folder / "qa.jsonl", None)
    path = tmp_path / "r.jsonl"
    with ResultsFile.open(path, SETTINGS) as results:
        fresh = Tally()
        assert len(list(unanswered(source, folder, results, fresh, lambda: None))) == 13
        assert fresh.skipping_seconds == 0.0
        for q in list(source)[:10]:
            results.append(batch.question_record(q, folder) | {"answer": "x", "correct": False})
        resumed = Tally()
        assert len(list(unanswered(source, folder, results, resumed, lambda: None))) == 3
    assert resumed.questions == 10 and resumed.skipping_seconds > 0
