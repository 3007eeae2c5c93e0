"""Hostile names and text, round two: a NUL byte in a video's name, bytes that are not UTF-8 in a
question, a questions file that reaches outside its folder, and resumes that must not be refused (a
moved questions file, a seed that `none` never uses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from typer.testing import CliRunner

from tests.test_batch import read_results
from tests.test_hostile import assert_one_line_error
from vidsparse.cli import app

runner = CliRunner()
NOT_UTF8 = b"what \xff\xfe color ?"


def batch(folder, questions, out, model, *more):
    return runner.invoke(app, ["batch", str(folder), "--questions", str(questions), "--out", str(out), "--model",
                               str(model), "--max-new-tokens", "1", *map(str, more)])


def write_questions(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_a_nul_byte_in_a_video_name_is_that_questions_error(folder, tmp_path, tiny_checkpoint):
    """It raised `ValueError: embedded null byte` in the decode thread: no record, every re-run the same."""
    questions = write_questions(tmp_path / "qa.jsonl", [
        {"video": "a.mp4", "question": "what color ?", "id": "ok"},
        {"video": "a\u0000.mp4", "question": "what color ?", "id": "nul"},
        {"video": "b.webm", "question": "what color ?", "id": "after"}])
    out = tmp_path / "r.jsonl"
    result = batch(folder, questions, out, tiny_checkpoint)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    records = {r["id"]: r for r in read_results(out)[1]}
    assert "NUL byte" in records["nul"]["error"]
    assert "error" not in records["ok"] and "error" not in records["after"]
    sweep = runner.invoke(app, ["sweep", str(folder), "--questions", str(questions), "--model", str(tiny_checkpoint),
                                "--methods", "none", "--budgets", "100%", "--repeats", "1", "--max-new-tokens", "1",
                                "--out", str(tmp_path / "s")])
    assert sweep.exit_code == 1 and "NUL byte" in sweep.stderr and "Traceback" not in sweep.output, sweep.output
    assert (tmp_path / "s" / "sweep.csv").exists()


def run_cli(*args: str | bytes) -> subprocess.CompletedProcess:
    """The real command line, where argv holds bytes (CliRunner passes text only)."""
    return subprocess.run([sys.executable, "-m", "vidsparse", *args], capture_output=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200"})


def test_bytes_that_are_not_utf8_in_a_command_line_question(folder, clips, tmp_path, tiny_checkpoint):
    """They arrive as lone surrogates and ended in a tokenizer's TypeError traceback."""
    for args in (["ask", str(clips["h264"]), NOT_UTF8],
                 ["sweep", str(clips["h264"]), NOT_UTF8, "--out", str(tmp_path / "s")],
                 ["batch", str(folder), "--question", NOT_UTF8, "--out", str(tmp_path / "r.jsonl")]):
        done = run_cli(*args, "--model", str(tiny_checkpoint))
        stderr = done.stderr.decode()
        assert done.returncode == 2 and "not UTF-8 text" in stderr and r"\xff\xfe" in stderr, stderr
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "s").exists()


def test_a_lone_surrogate_in_a_questions_file_is_a_clear_record(folder, tmp_path, tiny_checkpoint):
    questions = tmp_path / "qa.jsonl"
    questions.write_text('{"video": "a.mp4", "question": "what \\udcff ?", "id": "bad"}\n'
                         '{"video": "a.mp4", "question": "what color ?", "id": "good"}\n')
    out = tmp_path / "r.jsonl"
    assert batch(folder, questions, out, tiny_checkpoint).exit_code == 1
    records = {r["id"]: r for r in read_results(out)[1]}
    assert records["bad"]["error"].startswith("the question is not UTF-8 text")
    assert "error" not in records["good"]


def test_a_questions_file_may_not_leave_its_folder_unless_told(folder, tmp_path, tiny_checkpoint):
    """`../` (or an absolute path elsewhere) let a questions file read any file on the machine."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(folder / "a.mp4", videos / "inside.mp4")
    shutil.copy(folder / "a.mp4", tmp_path / "outside.mp4")
    (videos / "link.mp4").symlink_to(tmp_path / "outside.mp4")  # a folder of links to clips is a folder of clips
    out = tmp_path / "r.jsonl"
    for name in ("sub/../../outside.mp4", str(tmp_path / "outside.mp4"), "../outside.mp4"):
        questions = write_questions(tmp_path / "qa.jsonl", [
            {"video": "inside.mp4", "question": "what ?"}, {"video": "link.mp4", "question": "what ?"},
            {"video": name, "question": "what ?"}])
        assert_one_line_error(batch(videos, questions, out, tiny_checkpoint),
                              f"line 3: video {name!r} is outside {videos} (--allow-outside-folder")
        assert not out.exists()
    allowed = batch(videos, questions, out, tiny_checkpoint, "--allow-outside-folder")
    assert allowed.exit_code == 0, allowed.output
    assert [r.get("error") for r in read_results(out)[1]] == [None, None, None]


def test_a_moved_questions_file_resumes(folder, tmp_path, tiny_checkpoint):
    """The questions are compared by content (each recorded id must still name its question), not by the
    file's path: a copied or moved file resumes, asking nothing twice."""
    out = tmp_path / "r.jsonl"
    assert batch(folder, folder / "qa.jsonl", out, tiny_checkpoint).exit_code == 1  # broken.mp4
    before = out.read_text()
    moved = tmp_path / "elsewhere" / "questions.jsonl"
    moved.parent.mkdir()
    shutil.copy(folder / "qa.jsonl", moved)
    again = batch(folder, moved, out, tiny_checkpoint)
    assert again.exit_code == 1 and "--retry-errors" in again.stderr, again.output
    assert out.read_text() == before


def test_a_seed_is_no_setting_of_method_none(folder, tmp_path, tiny_checkpoint):
    """Only `random` draws from the seed: a `none` run resumed with another --seed was refused."""
    out = tmp_path / "r.jsonl"
    assert batch(folder, folder / "qa.jsonl", out, tiny_checkpoint, "--seed", 3).exit_code == 1
    before = out.read_text()
    again = batch(folder, folder / "qa.jsonl", out, tiny_checkpoint, "--seed", 4)
    assert again.exit_code == 1 and "other settings" not in again.stderr, again.output
    assert out.read_text() == before
    refused = batch(folder, folder / "qa.jsonl", out, tiny_checkpoint, "--method", "random", "--seed", 4)
    assert refused.exit_code == 2 and "other settings" in refused.stderr
