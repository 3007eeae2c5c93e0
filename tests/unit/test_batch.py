"""`vidsparse batch`: question files, crash-safe results, resume after kill -9, summary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.conftest import kill_9_after, save_tiny_checkpoint, signal_after
from vidsparse.cli import app
from vidsparse.errors import UserError
from vidsparse.metrics import is_correct, normalize_answer, summarize
from vidsparse.questions import QuestionSource, load_questions
from vidsparse.results import ResultsFile

runner = CliRunner()


def test_answers_are_normalised_before_matching():
    assert normalize_answer("The Red  square!") == "red square"
    assert is_correct("A circle.", "circle") and not is_correct("circles", "circle")


def test_questions_from_jsonl(folder):
    questions = load_questions(folder, folder / "qa.jsonl", None)
    assert len(questions) == 13 and len({q.id for q in questions}) == 13
    assert questions[8].video == folder / "sub/c.mp4" and questions[0].type == "color"


def test_questions_from_msvd_json_layout(folder, tmp_path):
    items = [{"video_id": "a", "question": "what ?", "answer": "x", "question_id": 7},
             {"video_id": "c", "question": "who ?", "answer": "y", "question_id": 8}]
    path = tmp_path / "msvd.json"
    path.write_text(json.dumps(items))
    questions = load_questions(folder, path, None)
    assert [(q.id, q.video.name, q.answer) for q in questions] == [("7", "a.mp4", "x"), ("8", "c.mp4", "y")]


def test_one_question_for_every_video(folder):
    questions = load_questions(folder, None, "what is happening ?")
    assert [q.id for q in questions] == ["a.mp4", "b.webm", "broken.mp4", "sub/c.mp4"]


def test_hidden_files_and_folders_are_not_clips(folder, tmp_path):
    root = tmp_path / "videos"
    shutil.copytree(folder, root)
    (root / "._a.mp4").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork beside a.mp4
    (root / ".cache").mkdir()
    shutil.copy(root / "a.mp4", root / ".cache" / "copy.mp4")
    found = {q.id for q in load_questions(root, None, "what color ?")}
    assert found == {"a.mp4", "b.webm", "broken.mp4", "sub/c.mp4"}
    with pytest.raises(UserError, match="no such folder"):
        load_questions(tmp_path / "missing", None, "what color ?")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no video files"):  # said when the source is built, before any lock
        QuestionSource(tmp_path / "empty", None, "what color ?")


def test_a_null_field_is_no_field(folder, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"video": "a.mp4", "question": "q", "id": null}\n'
                    '{"video": null, "video_id": "c", "question": "q", "type": 3}\n')
    assert [(q.id, q.video.name, q.type) for q in load_questions(folder, path, None)] == [
        ("a.mp4|q", "a.mp4", None), ("sub/c.mp4|q", "c.mp4", 3)]


def test_a_question_may_hold_a_line_separator(folder, tmp_path):
    """JSON strings may hold U+2028 unescaped (json.dumps(ensure_ascii=False) writes it); a JSON-lines
    file is split at newlines only."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"video": "a.mp4", "question": "what\u2028now ?"}, ensure_ascii=False) + "\r\n",
                    encoding="utf-8")
    assert [q.question for q in load_questions(folder, path, None)] == ["what\u2028now ?"]


@pytest.mark.parametrize(
    "content, message",
    [('{"video": "a.mp4"}\n', "needs a 'question' \\(a string\\)"), ("not json\n", "line 1: not valid JSON"),
     ('{"question": "q"}\n', "needs 'video'"),
     ('{"video": "a.mp4", "question": "q", "id": 1}\n{"video": "a.mp4", "question": "r", "id": 1}\n', "twice"),
     # JSON of the wrong type is refused, not answered as Python text ("['q']", "{'a': 1}", "None").
     ('{"video": "a.mp4", "question": ["q"]}\n', "'question' \\(a string\\)"),
     ('{"video": "a.mp4", "question": null}\n', "'question' \\(a string\\)"),
     ('{"video": "a.mp4", "question": "q", "answer": {"a": 1}}\n', "'answer' must be a string or a number"),
     ('{"video": "a.mp4", "question": "q", "id": true}\n', "'id' must be a string or a number, got true"),
     ('{"video": ["a.mp4"], "question": "q"}\n', "'video' must be a string"),
     ('{"video": null, "question": "q"}\n', "needs 'video'"),
     ('{"video": "a.mp4", "question": "q", "answer": NaN}\n', "line 1: not valid JSON"),
     # Where: a JSON-lines file's line (blank lines counted), a JSON list's item.
     ('{"video": "a.mp4", "question": "q"}\n\n{"video": "a.mp4"}\n', "line 3: needs a 'question'"),
     ('{"video": "a.mp4", "question": "q"}\n[1, 2]\n', "line 2: not a JSON object"),
     ('[{"video": "a.mp4", "question": "q"}, "a.mp4"]', "item 2: not a JSON object")],
)
def test_bad_question_files(folder, tmp_path, content, message):
    path = tmp_path / "qa.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_questions(folder, path, None)


SETTINGS = {"model": "m", "method": "fastv", "budget": "10%"}
HEADER = json.dumps({"vidsparse": "results", "version": 1, "settings": SETTINGS}) + "\n"


def test_results_file_cuts_a_partial_last_line_and_nothing_else(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(HEADER + '{"id": "1"}\n{"id": "2"}\n{"id": "3", "answ')
    with ResultsFile.open(path, SETTINGS) as results:
        assert set(results.index) == {"1", "2"}
        results.append({"id": "3"})
    assert path.read_text() == HEADER + '{"id": "1"}\n{"id": "2"}\n{"id": "3"}\n'


def test_a_new_results_file_starts_with_its_settings(tmp_path):
    path = tmp_path / "new" / "r.jsonl"
    with ResultsFile.open(path, SETTINGS) as results:
        results.append({"id": "1"})
    assert path.read_text().splitlines()[0] == HEADER.strip()
    with ResultsFile.open(path, SETTINGS) as results:
        assert set(results.index) == {"1"}


def test_ctrl_c_while_a_record_is_written_keeps_and_counts_it(tmp_path, monkeypatch):
    """A Ctrl-C that lands while the first record is being written: the record is kept whole and
    counted (an uncounted first record would be removed with the file it was written to), and the
    interrupt still arrives, once the record is safe."""
    path = tmp_path / "r.jsonl"
    write_line = ResultsFile._write_line

    def interrupted_write(self, value):
        write_line(self, value)
        if "id" in value:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(ResultsFile, "_write_line", interrupted_write)
    # SIGINT handled as a terminal's Ctrl-C finds it (a suite started as a shell's background job has it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), ResultsFile.open(path, SETTINGS) as results:
            results.append({"id": "1"})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert results.appended == 1 and path.read_text() == HEADER + '{"id": "1"}\n'


@pytest.mark.parametrize("content", [
    '{"video": "a.mp4", "question": "what ?"}\n',  # a questions file
    "notes about the run\n",
    b"\x00\x00\x00\x18ftypmp42\x00\x00",  # an mp4, no newline anywhere
    '{"id": "1", "answer": "x"}\n',  # records without the header
])
def test_a_file_that_is_not_a_results_file_is_refused_untouched(tmp_path, content):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = path.read_bytes()
    with pytest.raises(UserError, match="not a vidsparse results file"):
        ResultsFile.open(path, SETTINGS)
    assert path.read_bytes() == before


@pytest.mark.parametrize("bad", ["{broken json", "[1, 2]", "7", '{"no": "id"}'])
def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path, bad):
    path = tmp_path / "r.jsonl"
    path.write_text(HEADER + '{"id": "1"}\n' + bad + '\n{"id": "2"}\n')
    before = path.read_bytes()
    with pytest.raises(UserError, match="line 3: not a results record"):
        ResultsFile.open(path, SETTINGS)
    assert path.read_bytes() == before


def test_other_settings_are_refused_naming_what_differs(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(HEADER + '{"id": "1"}\n')
    with pytest.raises(UserError, match=r"budget '10%' there, '25%' now.*new --out") as error:
        ResultsFile.open(path, SETTINGS | {"budget": "25%"})
    assert "method" not in str(error.value)
    assert path.read_text() == HEADER + '{"id": "1"}\n'


def test_a_header_without_the_source_still_resumes_but_never_without_a_setting(tmp_path):
    """A run of an earlier version, whose header did not record the questions' source or the weights'
    fingerprint, still resumes; a header that lacks any other setting is compared on it (and refused)."""
    path = tmp_path / "r.jsonl"
    path.write_text(HEADER + '{"id": "1"}\n')
    with ResultsFile.open(path, SETTINGS | {"videos": "/clips", "weights": "0123456789abcdef"}) as results:
        assert set(results.index) == {"1"}
    with pytest.raises(UserError, match="seed None there, 0 now"):
        ResultsFile.open(path, SETTINGS | {"seed": 0})


def test_another_question_or_folder_is_not_taken_for_answers_given(folder, tmp_path, tiny_checkpoint):
    """With --question the ids are the videos' names: another question about the same clips, or the
    same question about another folder with the same names, must not be skipped as answered."""
    out = tmp_path / "r.jsonl"
    common = ["--out", str(out), "--model", str(tiny_checkpoint), "--max-new-tokens", "1"]
    first = runner.invoke(app, ["batch", str(folder), "--question", "what color ?", *common])
    assert first.exit_code == 1, first.output  # broken.mp4
    before = out.read_text()
    other = runner.invoke(app, ["batch", str(folder), "--question", "what moves ?", *common])
    assert other.exit_code == 2 and "question 'what color ?' there, 'what moves ?' now" in other.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "a.mp4").write_bytes(next(folder.rglob("*.mp4")).read_bytes())
    elsewhere = runner.invoke(app, ["batch", str(copy), "--question", "what color ?", *common])
    assert elsewhere.exit_code == 2 and f"videos {str(folder.resolve())!r} there" in elsewhere.stderr
    both = runner.invoke(app, ["batch", str(folder), "--question", "what color ?", "--questions",
                               str(folder / "qa.jsonl"), *common])
    assert both.exit_code == 2 and "not both" in both.stderr
    assert out.read_text() == before


@pytest.mark.parametrize("edit", [{"video": "b.webm"}, {"question": "what moves ?"}, {"answer": "circle"}])
def test_an_id_that_now_means_another_question_is_refused(folder, tmp_path, tiny_checkpoint, edit):
    """Editing the questions file between runs must not let a recorded id pass its old answer off as
    the answer to the new question under that id."""
    questions, out = tmp_path / "qa.jsonl", tmp_path / "r.jsonl"
    line = {"id": "q1", "video": "a.mp4", "question": "what color ?", "answer": "square"}
    questions.write_text(json.dumps(line) + "\n")
    command = ["batch", str(folder), "--questions", str(questions), "--out", str(out), "--model",
               str(tiny_checkpoint), "--max-new-tokens", "1"]
    assert runner.invoke(app, command).exit_code == 0
    before = out.read_text()
    questions.write_text(json.dumps(line | edit) + "\n")
    again = runner.invoke(app, command)
    assert again.exit_code == 2 and "id 'q1' was recorded with" in again.stderr, again.output
    assert out.read_text() == before
    questions.write_text(json.dumps(line) + "\n")  # restored: resumes, nothing left to answer
    assert runner.invoke(app, command).exit_code == 0 and out.read_text() == before


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsFile.open(path, SETTINGS) as first:
        first.append({"id": "1"})
        with pytest.raises(UserError, match=f"another vidsparse batch \\(process {os.getpid()}\\)"):
            ResultsFile.open(path, SETTINGS)
    with ResultsFile.open(path, SETTINGS) as again:  # released when the first run ends
        assert set(again.index) == {"1"}


def test_a_results_file_that_got_no_answer_is_removed(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsFile.open(path, SETTINGS):
        pass
    assert not path.exists()


def test_a_full_disk_keeps_every_complete_answer(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    with ResultsFile.open(path, SETTINGS) as results:
        results.append({"id": "1"})

        def disk_full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", disk_full)
        with pytest.raises(UserError, match="No space left on device.*re-run the same command"):
            results.append({"id": "2"})
    assert path.read_text() == HEADER + '{"id": "1"}\n'  # the failed line taken back


def read_results(path):
    """(header, records) of a results file."""
    header, *records = (json.loads(line) for line in path.read_text().splitlines())
    return header, records


def batch_args(folder, out, model):
    return ["batch", str(folder), "--questions", str(folder / "qa.jsonl"), "--out", str(out), "--model", str(model),
            "--method", "sparsevlm", "--budget", "25%", "--max-new-tokens", "2"]


def test_batch_records_the_bad_file_and_goes_on(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "results.jsonl"
    result = runner.invoke(app, batch_args(folder, out, tiny_checkpoint))
    assert result.exit_code == 1  # one question failed
    header, records = read_results(out)
    assert header["settings"] | {"model": None, "weights": None} == {
        "model": None, "weights": None, "dtype": "float32", "method": "sparsevlm", "budget": "25%", "prune_after": None,
        "positions": "keep", "min_per_frame": 0, "seed": 0, "num_frames": 8, "backend": "auto", "max_new_tokens": 2,
        "videos": str(folder.resolve()), "question": None}
    assert header["settings"]["model"] == str(tiny_checkpoint.resolve())
    assert len(header["settings"]["weights"]) == 16  # hex digits of the weights' fingerprint
    assert len(records) == 13
    errors = [r for r in records if r.get("error")]
    assert [r["video"] for r in errors] == ["broken.mp4"] and "not a video" in errors[0]["error"]
    assert errors[0]["answer"] is None and errors[0]["correct"] is None  # every record has the keys to read
    answered = [r for r in records if not r.get("error")]
    assert all(r["pruning"]["visual_per_stage"] == [136, 34] and isinstance(r["correct"], bool) for r in answered)
    # A clip's questions share its vision tower and prompt head: each record says with how many.
    per_video = {v: sum(r["video"] == v for r in answered) for v in {r["video"] for r in answered}}
    assert max(per_video.values()) > 1
    assert all(r["shared"]["questions"] == per_video[r["video"]] for r in answered)
    assert all(r["flops"]["amortised"] < r["flops"]["prefill"] + r["flops"]["vision"] for r in answered
               if r["shared"]["questions"] > 1)
    summary = json.loads((tmp_path / "results.summary.json").read_text())
    assert summary["questions_per_s_this_run"] > 0 and summary["amortised_flops_mean"] > 0
    assert summary["questions"] == 13 and summary["answered"] == 12 and summary["errors"] == 1
    assert summary["accuracy"] == summarize(records)["accuracy"]
    assert set(summary["accuracy_by_type"]) == {"color", "is", "moves"}
    assert "Batch summary" in result.stdout
    # Everything answered: a re-run asks nothing and writes nothing.
    again = runner.invoke(app, batch_args(folder, out, tiny_checkpoint))
    assert again.exit_code == 1 and len(read_results(out)[1]) == 13 and "--retry-errors" in again.stderr


def test_without_pruning_a_resume_is_not_refused_over_pruning_options(folder, tmp_path, tiny_checkpoint):
    """`--method none` keeps every token, so its answers cannot depend on --budget, --positions or
    --min-per-frame: a resume that repeats other values goes on (a method comparison script passes
    the same --budget to every method) instead of refusing the file."""
    out = tmp_path / "r.jsonl"
    common = ["batch", str(folder), "--questions", str(folder / "qa.jsonl"), "--out", str(out), "--model",
              str(tiny_checkpoint), "--method", "none", "--max-new-tokens", "1"]
    first = runner.invoke(app, [*common, "--budget", "10"])
    assert first.exit_code == 1, first.output  # broken.mp4
    header, records = read_results(out)
    assert header["settings"]["budget"] == "100%" and len(records) == 13
    again = runner.invoke(app, [*common, "--budget", "25%", "--positions", "compact", "--min-per-frame", "2"])
    assert again.exit_code == 1 and "--retry-errors" in again.stderr, again.output
    assert read_results(out) == (header, records)


def test_retry_errors_asks_the_failed_questions_again(folder, tmp_path, tiny_checkpoint):
    """Once the broken video is fixed, --retry-errors answers its question; the new record supersedes
    the error in the summary, and every earlier line stays."""
    videos = tmp_path / "videos"
    shutil.copytree(folder, videos)
    out = tmp_path / "results.jsonl"
    assert runner.invoke(app, batch_args(videos, out, tiny_checkpoint)).exit_code == 1
    before = out.read_text()
    shutil.copy(videos / "a.mp4", videos / "broken.mp4")
    fixed = runner.invoke(app, [*batch_args(videos, out, tiny_checkpoint), "--retry-errors"])
    assert fixed.exit_code == 0, fixed.output
    assert out.read_text().startswith(before)
    _, records = read_results(out)
    assert len(records) == 14 and records[-1]["video"] == "broken.mp4" and "error" not in records[-1]
    summary = json.loads((tmp_path / "results.summary.json").read_text())
    assert summary["questions"] == 13 and summary["answered"] == 13 and summary["errors"] == 0
    # Nothing failed any more: retrying asks nothing.
    assert runner.invoke(app, [*batch_args(videos, out, tiny_checkpoint), "--retry-errors"]).exit_code == 0
    assert len(read_results(out)[1]) == 14


def test_retry_errors_takes_a_corrected_video_for_a_question_with_its_own_id(folder, tmp_path, tiny_checkpoint):
    """Fixing a typo in the questions file is fixing the cause: the retried id may name another video."""
    questions = tmp_path / "qa.jsonl"
    args = ["batch", str(folder), "--questions", str(questions), "--out", str(tmp_path / "r.jsonl"), "--model",
            str(tiny_checkpoint), "--method", "none", "--max-new-tokens", "1"]
    questions.write_text(json.dumps({"video": "typo.mp4", "question": "what is it ?", "id": "q1"}) + "\n")
    assert runner.invoke(app, args).exit_code == 1
    questions.write_text(json.dumps({"video": "a.mp4", "question": "what is it ?", "id": "q1"}) + "\n")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "recorded with an error: --retry-errors asks it again" in refused.stderr
    assert runner.invoke(app, [*args, "--retry-errors"]).exit_code == 0
    errored, answered = read_results(tmp_path / "r.jsonl")[1]
    assert (errored["video"], answered["video"]) == ("typo.mp4", "a.mp4") and "error" not in answered
    # An answered id still may not change its video.
    questions.write_text(json.dumps({"video": "b.webm", "question": "what is it ?", "id": "q1"}) + "\n")
    assert "restore them" in runner.invoke(app, [*args, "--retry-errors"]).stderr


def test_ctrl_c_says_what_is_kept_and_how_to_resume(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "vidsparse", *batch_args(folder, out, tiny_checkpoint), "--decode-batch", "1"]
    written, code, stderr = signal_after(command, out, 3, 120, signal.SIGINT)
    assert code == 130 and "Traceback" not in stderr, stderr
    kept = len(read_results(out)[1])
    assert 2 <= kept < 13, "the run should have been interrupted part-way"
    assert f"interrupted: the {kept} record(s) of this run are kept in {out}; the same command resumes" in stderr
    assert out.read_text().splitlines()[: len(written)] == written


def test_ctrl_c_before_the_first_answer_says_nothing_was_written(folder, tmp_path, tiny_checkpoint, monkeypatch):
    from vidsparse import batch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "run_batch", interrupted)
    out = tmp_path / "results.jsonl"
    result = runner.invoke(app, batch_args(folder, out, tiny_checkpoint))
    assert result.exit_code == 130 and "interrupted: nothing of this run was written" in result.stderr
    assert not out.exists()  # a run that got no answer leaves no file


def test_resume_after_kill_9_loses_and_repeats_nothing(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "results.jsonl"
    # each clip alone (its 4 records written before the next clip is prepared): killed between clips
    command = [sys.executable, "-m", "vidsparse", *batch_args(folder, out, tiny_checkpoint), "--group-mb", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    written = kill_9_after(command, out, 4, timeout_s=120)
    assert 4 <= len(written) < 14, "the run should have been killed part-way"
    with open(out, "a") as f:  # what a kill in the middle of a write would leave
        f.write('{"id": "a.mp4|what moves ?", "answer": "squ')
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in lines[1:]]
    assert len(ids) == len(set(ids)) == 13
    assert [json.loads(line) for line in written] == lines[: len(written)]  # old results untouched


def test_new_weights_under_the_same_name_are_not_taken_for_answers_given(folder, tmp_path):
    """A checkpoint retrained in place (or a release shipping new weights under an alias) keeps its
    name; the results file records a fingerprint of the weights, so resuming on other weights is
    refused and the answers already written stay as they are."""
    model = save_tiny_checkpoint(tmp_path / "model", seed=0)
    out = tmp_path / "r.jsonl"
    args = ["batch", str(folder), "--question", "what color ?", "--out", str(out), "--model", str(model),
            "--max-new-tokens", "1"]
    assert runner.invoke(app, args).exit_code == 1  # broken.mp4
    before = out.read_text()
    assert runner.invoke(app, args).exit_code == 1 and out.read_text() == before  # same weights: all done
    save_tiny_checkpoint(model, seed=1)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "weights '" in again.stderr and "there" in again.stderr
    assert out.read_text() == before


def test_the_weights_fingerprint_tells_weights_apart_whole_or_sampled(tmp_path, monkeypatch):
    from vidsparse.models import loading

    first = loading.find_checkpoint(str(save_tiny_checkpoint(tmp_path / "a", seed=0)))
    same = loading.find_checkpoint(str(save_tiny_checkpoint(tmp_path / "b", seed=0)))
    other = loading.find_checkpoint(str(save_tiny_checkpoint(tmp_path / "c", seed=1)))
    whole = [loading.weights_fingerprint(s) for s in (first, same, other)]
    monkeypatch.setattr(loading, "WHOLE_FILE_LIMIT", 0)  # every file sampled, as a 14 GB one is
    monkeypatch.setattr(loading, "SAMPLE_BYTES", 256)
    sampled = [loading.weights_fingerprint(s) for s in (first, same, other)]
    for a, b, c in (whole, sampled):
        assert a == b != c
    assert whole[0] != sampled[0]
    assert loading.weights_fingerprint(loading.Source("org/name", "org/name", True)) is None
