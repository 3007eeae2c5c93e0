"""`vidsparse sweep` and the kept-token picture."""

from __future__ import annotations

import csv
import json

from PIL import Image
from typer.testing import CliRunner

from vidsparse.batch import AskOptions
from vidsparse.cli import app
from vidsparse.pipeline import VideoQA
from vidsparse.questions import Question
from vidsparse.sweep import run_sweep, sweep_cells

runner = CliRunner()


class RecordingQA(VideoQA):
    """The real model, with every ask's (method, budget) recorded in call order."""

    def __init__(self, qa: VideoQA):
        super().__init__(qa.model)
        self.calls: list[tuple[str, str]] = []

    def ask(self, video, question, **options):
        self.calls.append((options["method"], str(options["budget"])))
        return super().ask(video, question, **options)


def test_cells_are_interleaved_after_one_warm_up(tiny_checkpoint, clips):
    qa = RecordingQA(VideoQA.from_pretrained(str(tiny_checkpoint)))
    options = AskOptions(max_new_tokens=1)
    cells = sweep_cells(["none", "fastv", "tome"], ["50%", "10%"], options)
    assert [(c.method, c.budget) for c in cells] == [("none", "-"), ("fastv", "50%"), ("fastv", "10%"),
                                                      ("tome", "50%"), ("tome", "10%")]
    run_sweep(qa, [Question("q", clips["h264"], "what ?")], cells, options, repeats=2)
    order = [("none", "194"), ("fastv", "50%"), ("fastv", "10%"), ("tome", "50%"), ("tome", "10%")]
    assert qa.calls == [("none", "194")] + order * 2
    assert [len(c.prefill_ms) for c in cells] == [1] * 5


def test_sweep_one_clip_writes_table_csv_json_and_plots(tiny_checkpoint, clips, tmp_path):
    result = runner.invoke(app, ["sweep", str(clips["h264"]), "what color is the square ?", "--model",
                                 str(tiny_checkpoint), "--methods", "none,fastv,sparsevlm", "--budgets", "50%,10",
                                 "--repeats", "1", "--max-new-tokens", "2", "--out", str(tmp_path), "--show-kept"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["method"], r["budget"], r["visual_tokens"]) for r in rows] == [
        ("none", "-", 136), ("fastv", "50%", 68), ("fastv", "10", 10), ("sparsevlm", "50%", 68),
        ("sparsevlm", "10", 10)]
    assert rows[0]["prefill_speedup"] == 1.0 and rows[0]["agreement_with_none"] == 1.0
    assert all(r["answer"] is not None and r["accuracy"] is None for r in rows)
    assert rows[2]["prefill_tflops"] < rows[0]["prefill_tflops"] or rows[0]["prefill_tflops"] == 0
    with open(tmp_path / "sweep.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [r["method"] for r in rows]
    for name in ("accuracy.png", "latency.png", "kept-fastv.png", "kept-sparsevlm.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 300
    assert "x prefill" in result.stdout


def test_sweep_a_folder_reports_accuracy(tiny_checkpoint, folder, tmp_path):
    result = runner.invoke(app, ["sweep", str(folder), "--questions", str(folder / "qa.jsonl"), "--model",
                                 str(tiny_checkpoint), "--methods", "none,uniform", "--budgets", "5%",
                                 "--repeats", "1", "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "broken.mp4" in result.stderr  # a sweep needs every clip readable
    good = tmp_path / "qa.jsonl"
    good.write_text("".join(line + "\n" for line in (folder / "qa.jsonl").read_text().splitlines()
                            if "broken" not in line))
    result = runner.invoke(app, ["sweep", str(folder), "--questions", str(good), "--model", str(tiny_checkpoint),
                                 "--methods", "none,uniform", "--budgets", "5%", "--repeats", "1",
                                 "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert all(r["accuracy"] is not None and r["answer"] is None for r in rows)


def test_ask_show_kept_draws_the_surviving_tokens(tiny_checkpoint, clips, tmp_path):
    picture = tmp_path / "kept.png"
    result = runner.invoke(app, ["ask", str(clips["h264"]), "what color is the square ?", "--model",
                                 str(tiny_checkpoint), "--method", "sparsevlm", "--budget", "20",
                                 "--max-new-tokens", "1", "--show-kept", str(picture)])
    assert result.exit_code == 0, result.output
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 600


def test_kept_tokens_map_back_to_frames_and_patches(tiny_checkpoint, clips):
    qa = VideoQA.from_pretrained(str(tiny_checkpoint))
    result = qa.ask(clips["h264"], "what ?", method="uniform", budget=8, max_new_tokens=1)
    kept = result.kept_tokens()
    # One token per frame, each the centre of its frame's 4 x 4 patch grid (patch 8 of 16: row 2, col 0).
    assert [(t["frame"], t["row"], t["col"], t["merged"]) for t in kept] == [(f, 2, 0, False) for f in range(8)]
