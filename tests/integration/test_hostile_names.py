"""Hostile names and text, round two: a NUL byte in a video's name, bytes that are not UTF-8 in a
question, a questions file that reaches outside its folder, and resumes that must not be refused (a
moved questions file, a seed that `none` never uses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.integration.test_hostile import assert_one_line_error
from tests.unit.test_batch import read_results
from vidsparse.cli import app
from vidsparse.errors import UserError

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


# \udcff stands for the byte 0xff (a file may have it in its name); \ud800 for no byte at all.
@pytest.mark.parametrize("escape, in_a_name", [("\\udcff", "video not found"),
                                               ("\\ud800", "not valid text for a file name")])
def test_a_lone_surrogate_in_a_questions_file_is_a_clear_record(folder, tmp_path, tiny_checkpoint, escape, in_a_name):
    questions = tmp_path / "qa.jsonl"
    questions.write_text(f'{{"video": "a.mp4", "question": "what {escape} ?", "id": "bad"}}\n'
                         '{"video": "a.mp4", "question": "what color ?", "id": "good"}\n'
                         f'{{"video": "a{escape}.mp4", "question": "what color ?", "id": "name"}}\n')
    out = tmp_path / "r.jsonl"
    assert batch(folder, questions, out, tiny_checkpoint).exit_code == 1
    records = {r["id"]: r for r in read_results(out)[1]}
    assert records["bad"]["error"].startswith("the question is not UTF-8 text")
    assert in_a_name in records["name"]["error"] and "NUL" not in records["name"]["error"]
    assert "error" not in records["good"]
    sweep = runner.invoke(app, ["sweep", str(folder), "--questions", str(questions), "--model", str(tiny_checkpoint),
                                "--methods", "none", "--budgets", "100%", "--repeats", "1", "--max-new-tokens", "1",
                                "--out", str(tmp_path / "s")])
    assert sweep.exit_code == 1 and "not UTF-8 text" in sweep.stderr and "Traceback" not in sweep.output, sweep.output


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


def test_leaving_the_folder_is_judged_on_the_path_not_its_spelling(folder, tmp_path, tiny_checkpoint, monkeypatch):
    """An absolute path inside a folder given relative is inside; `..` after a link to a folder leads
    out of the link's target, so any `..` leaves the folder."""
    monkeypatch.chdir(tmp_path)
    videos, elsewhere = tmp_path / "videos", tmp_path / "elsewhere" / "deep"
    videos.mkdir()
    elsewhere.mkdir(parents=True)
    shutil.copy(folder / "a.mp4", videos / "inside.mp4")
    shutil.copy(folder / "a.mp4", elsewhere.parent / "secret.mp4")
    (videos / "sub").symlink_to(elsewhere)
    out = tmp_path / "r.jsonl"
    inside = write_questions(tmp_path / "in.jsonl", [{"video": str(videos / "inside.mp4"), "question": "what ?"}])
    assert batch("videos", inside, out, tiny_checkpoint).exit_code == 0
    escape = write_questions(tmp_path / "out.jsonl", [{"video": "sub/../secret.mp4", "question": "what ?"}])
    assert_one_line_error(batch("videos", escape, tmp_path / "r2.jsonl", tiny_checkpoint), "is outside videos")


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
    # A file of the version that recorded `none`'s seed resumes with the same command.
    header, *records = out.read_text().splitlines(keepends=True)
    settings = json.loads(header)
    settings["settings"]["seed"] = 3
    out.write_text(json.dumps(settings) + "\n" + "".join(records))
    assert batch(folder, folder / "qa.jsonl", out, tiny_checkpoint, "--seed", 3).exit_code == 1


@pytest.mark.parametrize("line, message", [
    ('{"video": "a.mp4", "question": "q", "id": ' + "9" * 5000 + "}", "line 1: not valid JSON"),
    ("[" * 200_000, "is not valid JSON"),  # read as a JSON list
    ('{"video": "a.mp4", "question": "' + "x" * (3 * 2**20) + '"}', "line 1: longer than 1 MiB"),
], ids=["5000 digits", "nested", "3 MiB line"])
def test_json_no_reader_can_take_is_one_line(folder, tmp_path, tiny_checkpoint, line, message):
    """A 5000-digit number, lists nested 200,000 deep (Python's own limits) and a line of megabytes."""
    questions = tmp_path / "qa.jsonl"
    questions.write_text(line + "\n")
    assert_one_line_error(batch(folder, questions, tmp_path / "r.jsonl", tiny_checkpoint), message)


def test_a_refused_batch_leaves_no_folders_behind(folder, tmp_path):
    """The lock is taken first, so --out's folders exist before the model is found: a run refused
    after that removes the folders it made, as it removes the file."""
    out = tmp_path / "new" / "sub" / "r.jsonl"
    result = batch(folder, folder / "qa.jsonl", out, tmp_path / "no-such-model")
    assert result.exit_code == 2 and not (tmp_path / "new").exists(), result.output


def test_a_picture_larger_than_8k_is_refused_before_decoding(tmp_path):
    from vidsparse.video import Header, check_header

    check_header(tmp_path / "c.mp4", Header(7680, 4320))  # 8K UHD is video
    with pytest.raises(UserError, match="more than 8K video's 33.2 megapixels"):
        check_header(tmp_path / "c.mp4", Header(16384, 2048))
