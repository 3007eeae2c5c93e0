"""Hostile and odd inputs, through the CLI: each ends in one line on stderr and exit code 2 (in
`batch`: one error record, the rest answered), never a traceback, never a hang."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.integration.test_fuzz import no_constants
from vidsparse.cli import app
from vidsparse.results import ResultsFile

runner = CliRunner()
QUESTION = "what color is the square ?"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def ask(video, question, model, *options):
    return invoke("ask", video, question, "--model", model, "--max-new-tokens", 2, *options)


# ---------------------------------------------------------------- special files and questions
def test_a_fifo_as_the_video_is_refused_at_once(tmp_path, tiny_checkpoint):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    assert_one_line_error(ask(fifo, QUESTION, tiny_checkpoint), "not a regular file")
    assert_one_line_error(invoke("sweep", fifo, QUESTION, "--model", tiny_checkpoint, "--out", tmp_path / "s"),
                          "not a regular file")


def test_a_strip_of_absurd_geometry_is_refused_in_one_line(tmp_path, tiny_checkpoint):
    from tests.unit.test_video import solid_clip

    strip = solid_clip(tmp_path / "strip.mkv", 16000, 16)  # 16 kB that once made `ask` take 20.9 GB
    assert_one_line_error(ask(strip, QUESTION, tiny_checkpoint), "16000x16 pixels, an aspect ratio beyond 100:1")


def test_an_image_is_refused_in_one_line(tmp_path, tiny_checkpoint):
    from PIL import Image

    picture = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), "red").save(picture)
    assert_one_line_error(ask(picture, QUESTION, tiny_checkpoint), "photo.jpg is an image (jpeg), not a video")


def test_special_tokens_in_a_question(clips, tiny_checkpoint):
    assert_one_line_error(ask(clips["h264"], "what <video> is this ?", tiny_checkpoint), "special token")
    assert_one_line_error(ask(clips["h264"], "where </s> now", tiny_checkpoint), "'</s>'")


def test_one_question_for_every_video_is_refused_once_when_it_cannot_be_asked(clips, tmp_path, tiny_checkpoint):
    """--question is asked of every video: a bad one is the user's mistake, not one error per clip."""
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(clips["h264"], folder / "good.mp4")
    out = tmp_path / "r.jsonl"
    batch = ("batch", folder, "--out", out, "--model", tiny_checkpoint, "--max-new-tokens", 1, "--question")
    assert_one_line_error(invoke(*batch, "what <video> ?"), "special token")
    assert_one_line_error(invoke(*batch, "   "), "the question asked of every video is empty")
    assert not out.exists()  # nothing answered, nothing left behind
    shutil.copy(clips["h264"], folder / "other.mp4")
    sweep = ("sweep", folder, "--model", tiny_checkpoint, "--methods", "none", "--out", tmp_path / "s")
    refused = invoke(*sweep, "what <video> ?")
    assert_one_line_error(refused, "special token")
    assert refused.stderr.count("special token") == 1
    assert_one_line_error(invoke("sweep", clips["h264"], "   ", "--model", tiny_checkpoint, "--out", tmp_path / "s"),
                          "the question is empty")


def test_batch_records_a_bad_question_or_special_file_and_answers_the_rest(clips, tmp_path, tiny_checkpoint):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(clips["h264"], folder / "good.mp4")
    os.mkfifo(folder / "pipe.mp4")
    items = [{"video": "good.mp4", "question": QUESTION, "id": "ok"},
             {"video": "good.mp4", "question": "what <video> ?", "id": "special"},
             {"video": "good.mp4", "question": " ", "id": "empty"},
             {"video": "pipe.mp4", "question": QUESTION, "id": "fifo"},
             {"video": str(folder / "good.mp4"), "question": "what is happening ?", "id": "absolute"}]
    (folder / "qa.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "r.jsonl"
    result = invoke("batch", folder, "--questions", folder / "qa.jsonl", "--out", out, "--model", tiny_checkpoint,
                    "--max-new-tokens", 1)
    assert result.exit_code == 1 and "Traceback" not in result.output
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines()[1:])}
    assert set(records) == {"ok", "special", "empty", "fifo", "absolute"}
    assert "special token" in records["special"]["error"] and "not a regular file" in records["fifo"]["error"]
    assert records["empty"]["error"] == "the question is empty"
    assert "error" not in records["ok"] and "error" not in records["absolute"]


# ---------------------------------------------------------------- broken checkpoints
def _edit_json(name):
    def edit(folder, change):
        path = folder / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


def _pickle_with_code(folder):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))


BROKEN = {
    "truncated weights": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
        "model.safetensors"),
    "garbage weights": (lambda f: (f / "model.safetensors").write_bytes(os.urandom(3000)), "model.safetensors"),
    "weights of another size": (lambda f: _edit_json("config.json")(f, lambda c: c["text_config"].update(
        hidden_size=32, head_dim=8)), "does not match config.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "cannot load"),
    "pickled code": (_pickle_with_code, "pickled code"),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     "has no tokenizer (tokenizer.json"),
    "garbage tokenizer": (lambda f: (f / "tokenizer.json").write_text("{not json"), "tokenizer.json"),
    "tokenizer of another model": (lambda f: _edit_json("config.json")(f, lambda c: c.update(video_token_index=4)),
                                   "do not belong together"),
    "bad preprocessor config": (lambda f: (f / "preprocessor_config.json").write_text("{bad"),
                                "preprocessor_config.json is not valid JSON"),
    "preprocessor config with a string mean": (
        lambda f: (f / "preprocessor_config.json").write_text('{"image_mean": "x", "image_std": [1, 1, 1]}'),
        "image_mean must be three finite numbers"),
    "patch size 0": (lambda f: _edit_json("config.json")(f, lambda c: c["vision_config"].update(patch_size=0)),
                     "patch_size is 0"),
    "config that is a list": (lambda f: (f / "config.json").write_text("[1, 2]"),
                              "not a checkpoint of a model family vidsparse runs (model_type is None"),
    "config without vision_config": (lambda f: _edit_json("config.json")(f, lambda c: c.pop("vision_config")),
                                     "config.json has no vision_config: not a complete video_llava checkpoint's "
                                     "config"),
    "config without text_config": (lambda f: _edit_json("config.json")(f, lambda c: c.pop("text_config")),
                                   "config.json has no text_config: not a complete video_llava checkpoint's config"),
    "config that is a FIFO": (lambda f: ((f / "config.json").unlink(), os.mkfifo(f / "config.json")),
                              "config.json is not a regular file (a pipe, socket or device)"),
    "config with a wrong type": (lambda f: _edit_json("config.json")(f, lambda c: c["text_config"].update(
        num_hidden_layers="four")), "expected int, got str"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_is_one_line_naming_the_file(case, tiny_checkpoint, clips, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    breaking, message = BROKEN[case]
    breaking(folder)
    result = ask(clips["h264"], QUESTION, folder)
    assert_one_line_error(result, message)
    assert "should-never-run" not in result.output


def test_a_checkpoint_file_that_is_a_fifo_is_refused_before_anything_is_read(tiny_checkpoint, tmp_path):
    """Called directly: through `ask`, a missing check would leave the tokenizer's reader blocked forever."""
    from vidsparse.errors import UserError
    from vidsparse.models.loading import find_checkpoint

    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    with pytest.raises(UserError, match="tokenizer.json is not a regular file"):
        find_checkpoint(str(folder))


def test_an_empty_model_name_a_file_or_a_folder_without_config(clips, tiny_checkpoint, tmp_path):
    assert_one_line_error(ask(clips["h264"], QUESTION, ""), "--model is empty")
    assert_one_line_error(ask(clips["h264"], QUESTION, tiny_checkpoint / "config.json"),
                          "is a file: --model takes the checkpoint's folder")
    assert_one_line_error(ask(clips["h264"], QUESTION, tmp_path), "is not a model folder (no config.json in it)")


# ---------------------------------------------------------------- outputs that cannot be written
def test_unwritable_outputs_fail_before_the_model_loads(clips, tmp_path, tiny_checkpoint, folder):
    batch = ("batch", folder, "--questions", folder / "qa.jsonl", "--model", tiny_checkpoint, "--out")
    assert_one_line_error(invoke(*batch, tmp_path), "is a directory")
    assert_one_line_error(invoke(*batch, "/proc/vidsparse-results.jsonl"), "cannot write the results file")
    assert_one_line_error(invoke(*batch, folder / "qa.jsonl"), "is the questions file")
    assert_one_line_error(ask(clips["h264"], QUESTION, tiny_checkpoint, "--show-kept", tmp_path), "is a directory")
    assert_one_line_error(ask(clips["h264"], QUESTION, tiny_checkpoint, "--show-kept", "/proc/x/kept.png"),
                          "cannot write")
    assert_one_line_error(invoke("sweep", clips["h264"], QUESTION, "--model", tiny_checkpoint, "--out",
                                 "/proc/vidsparse-sweep"), "cannot write")


def test_a_table_that_cannot_be_written_leaves_the_previous_one_and_no_stub(tmp_path, monkeypatch):
    import errno

    from vidsparse.errors import UserError
    from vidsparse.outputs import replace_file

    table = tmp_path / "sweep.csv"
    replace_file(table, "a,b\n1,2\n")

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(UserError, match="No space left"):
        replace_file(table, "a,b\n3,4\n")
    assert table.read_text() == "a,b\n1,2\n" and sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]


def test_results_onto_the_commands_own_stdout_are_refused(folder, tmp_path, tiny_checkpoint):
    """`--out /dev/stdout > file`: the summary table would be written over the results."""
    log = tmp_path / "log.txt"
    with log.open("w") as stdout:
        done = subprocess.run([sys.executable, "-m", "vidsparse", "batch", str(folder), "--question", "what ?",
                               "--model", str(tiny_checkpoint), "--out", "/dev/stdout"], stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "is this command's own standard output" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and log.read_text() == ""


def test_show_kept_never_overwrites_what_is_not_a_png(clips, tmp_path, tiny_checkpoint, folder):
    video = tmp_path / "clip.mp4"
    shutil.copy(clips["h264"], video)
    before = video.read_bytes()
    assert_one_line_error(ask(video, QUESTION, tiny_checkpoint, "--show-kept", video), "is not a PNG")
    assert video.read_bytes() == before
    questions = folder / "qa.jsonl"
    text = questions.read_text()
    assert_one_line_error(ask(video, QUESTION, tiny_checkpoint, "--show-kept", questions), "is not a PNG")
    assert questions.read_text() == text


def test_show_kept_naming_a_fifo_is_refused_without_opening_it(clips, tmp_path, tiny_checkpoint):
    """Opening a FIFO to look for a PNG signature waits for a writer forever: run as a process, so
    that a hang fails the test instead of stalling the suite."""
    fifo = tmp_path / "kept.png"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "vidsparse", "ask", str(clips["h264"]), QUESTION, "--model",
                           str(tiny_checkpoint), "--show-kept", str(fifo)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "is not a regular file (a pipe, socket or device)" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_show_kept_writes_exactly_the_path_given(clips, tmp_path, tiny_checkpoint):
    picture = tmp_path / "kept"  # no extension: nothing may be added to it
    result = ask(clips["h264"], QUESTION, tiny_checkpoint, "--method", "fastv", "--show-kept", picture)
    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not picture.with_suffix(".png").exists()
    again = ask(clips["h264"], QUESTION, tiny_checkpoint, "--method", "uniform", "--show-kept", picture)
    assert again.exit_code == 0, again.output  # an earlier picture may be replaced


def test_a_second_batch_on_the_same_results_waits_for_nobody(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "r.jsonl"
    with ResultsFile.open(out, {"held": "by this test"}):
        result = invoke("batch", folder, "--questions", folder / "qa.jsonl", "--out", out, "--model",
                        tiny_checkpoint)
    assert_one_line_error(result, f"being written by another vidsparse batch (process {os.getpid()})")


def test_resuming_with_other_settings_is_refused(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "r.jsonl"
    args = ("batch", folder, "--question", "what ?", "--out", out, "--model", tiny_checkpoint, "--max-new-tokens", 1,
            "--method", "fastv")
    assert invoke(*args, "--budget", "25%").exit_code == 1  # broken.mp4 fails, the rest is answered
    before = out.read_text()
    result = invoke(*args, "--budget", "10%")
    assert_one_line_error(result, "budget '25%' there, '10%' now")
    assert out.read_text() == before


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE + SIGXFSZ semantics")
def test_a_full_disk_mid_batch_keeps_every_answer_and_resumes(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "vidsparse", "batch", str(folder), "--questions", str(folder / "qa.jsonl"),
               "--out", str(out), "--model", str(tiny_checkpoint), "--max-new-tokens", "1"]

    def small_disk():  # writes past 12 kB fail with EFBIG, as a full disk fails them with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    full = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, preexec_fn=small_disk,
                          check=False)
    assert full.returncode == 2 and "re-run the same command to resume" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr
    kept = out.read_text()
    assert kept.endswith("\n") and 2 <= len(kept.splitlines()) < 14  # header + whole answers only
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 1, done.stderr  # broken.mp4 is an error record, as always
    assert out.read_text().startswith(kept) and len(out.read_text().splitlines()) == 14


# ---------------------------------------------------------------- questions files and odd options
def test_questions_files_in_odd_encodings(folder, tmp_path, tiny_checkpoint):
    line = json.dumps({"video": "a.mp4", "question": "what is the color ?", "id": "q"}) + "\n"
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + line.encode())
    result = invoke("batch", folder, "--questions", bom, "--out", tmp_path / "r.jsonl", "--model", tiny_checkpoint,
                    "--max-new-tokens", 1)
    assert result.exit_code == 0, result.output
    latin = tmp_path / "latin.jsonl"
    accented = json.dumps({"video": "a.mp4", "question": "qué ?"}, ensure_ascii=False)
    latin.write_bytes((line + accented + "\n").encode("latin-1"))
    assert_one_line_error(invoke("batch", folder, "--questions", latin, "--out", tmp_path / "r2.jsonl", "--model",
                                 tiny_checkpoint), "line 2: not UTF-8")


def test_a_seed_too_large_for_torch(clips, tiny_checkpoint):
    assert_one_line_error(ask(clips["h264"], QUESTION, tiny_checkpoint, "--method", "random", "--seed", 2**70),
                          "--seed must be at most")


def test_too_many_frames_fail_before_decoding(clips, tiny_checkpoint, monkeypatch, folder, tmp_path):
    from vidsparse import video

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a clip that cannot fit the context")

    monkeypatch.setattr(video, "decode_video", no_decoding)
    # 64 frames x 17 tokens + 2 new tokens > the tiny model's 1024 positions
    # Before the tokenizer is loaded the text is not counted: the advice is a bound, and says so.
    assert_one_line_error(ask(clips["h264"], QUESTION, tiny_checkpoint, "--frames", 64),
                          "needs more than 1090 positions (64 frames -> 1088 visual tokens, the prompt's text, 2 new "
                          "tokens) but the model has 1024: sample fewer --frames (60 would leave no room")
    assert_one_line_error(invoke("batch", folder, "--question", "what ?", "--out", tmp_path / "r.jsonl", "--model",
                                 tiny_checkpoint, "--frames", 64), "sample fewer --frames")
    assert not (tmp_path / "r.jsonl").exists()


def test_frames_advice_counts_the_question(clips, tiny_checkpoint):
    """Once the question is tokenized the advice is exact: the frames it names fit."""
    result = ask(clips["h264"], QUESTION, tiny_checkpoint, "--frames", 60)
    assert result.exit_code == 2
    fit = int(result.stderr.split("sample at most ")[1].split()[0])
    assert fit < 60 and ask(clips["h264"], QUESTION, tiny_checkpoint, "--frames", fit).exit_code == 0


def test_a_huge_question_says_to_shorten_it(clips, tiny_checkpoint):
    assert_one_line_error(ask(clips["h264"], "what " * 20_000 + "?", tiny_checkpoint), "shorten the question")


def test_json_output_is_strict_json(clips, tiny_checkpoint):
    result = ask(clips["h264"], QUESTION, tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout, parse_constant=no_constants)


def test_missing_video_is_answered_without_importing_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "vidsparse", "ask", "no-such.mp4", "what ?"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == "error: video not found: no-such.mp4"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported
    assert Path(done.stderr.splitlines()[-1]).name  # one line of error after the import log


def test_make_shapes_into_an_unwritable_folder():
    assert_one_line_error(invoke("make-shapes", "/proc/vidsparse-shapes", "--n", 2), "cannot write to /proc")


def test_any_file_system_refusal_is_one_line(clips, tiny_checkpoint, monkeypatch):
    from vidsparse import video

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", "/tmp/somewhere")

    monkeypatch.setattr(video, "decode_video", full_disk)
    assert_one_line_error(ask(clips["h264"], QUESTION, tiny_checkpoint), "No space left on device: /tmp/somewhere")
