"""`vidsparse sweep` and the kept-token picture."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from vidsparse.cli import app
from vidsparse.errors import UserError
from vidsparse.options import AskOptions, parse_budget
from vidsparse.pipeline import VideoQA
from vidsparse.questions import Question
from vidsparse.sweep import options_for, run_sweep, sweep_cells
from vidsparse.video import decode_video

runner = CliRunner()


class RecordingQA(VideoQA):
    """The real model, with every ask's (method, budget) recorded in call order."""

    def __init__(self, qa: VideoQA):
        super().__init__(qa.model)
        self.calls: list[tuple[str, str]] = []

    def answer(self, video, question, options, features=None):
        self.calls.append((options.method, str(options.budget)))
        return super().answer(video, question, options, features)


def test_cells_are_interleaved_after_one_warm_up(tiny_checkpoint, clips):
    qa = RecordingQA(VideoQA.from_pretrained(str(tiny_checkpoint)))
    options = AskOptions(max_new_tokens=1)
    budgets = [parse_budget(b) for b in ("50%", "10%")]
    cells = sweep_cells(["none", "fastv", "tome"], budgets, options)
    assert [(c.method, c.budget) for c in cells] == [("none", "-"), ("fastv", "50%"), ("fastv", "10%"),
                                                      ("tome", "50%"), ("tome", "10%")]
    run_sweep(qa, [Question("q", clips["h264"], "what ?")], cells, options, repeats=2)
    order = [("none", "194"), ("fastv", "50%"), ("fastv", "10%"), ("tome", "50%"), ("tome", "10%")]
    assert qa.calls == [("none", "194")] + order * 2
    assert [len(c.prefill_ms) for c in cells] == [1] * 5


def test_a_clip_goes_through_the_vision_tower_once_for_every_cell(tiny_checkpoint, clips, monkeypatch):
    qa = VideoQA.from_pretrained(str(tiny_checkpoint))
    options = AskOptions(max_new_tokens=2)
    cells = sweep_cells(["none", "fastv", "vidcom2"], [parse_budget("25%")], options)
    asked = [Question("a", clips["h264"], "what color is the square ?"), Question("b", clips["vp9"], "what ?"),
             Question("c", clips["h264"], "what moves ?")]
    expected = {(q.id, c.method): qa.answer(decode_video(q.video, 8), q.question, options_for(c, options)).answer
                for q in asked for c in cells}
    towers = []
    real = qa.model.video_features
    monkeypatch.setattr(qa.model, "video_features", lambda *a, **k: towers.append(1) or real(*a, **k))
    run_sweep(qa, asked, cells, options, repeats=2)
    assert len(towers) == 1 + 2  # the warm-up, then once per clip (h264's two questions share it)
    assert {(q.id, c.method): a for c in cells for q, a in zip(sorted(asked, key=lambda q: q.video != clips["h264"]),
                                                               c.answers, strict=True)} == expected
    assert all(ms > 0 for c in cells for ms in c.total_ms)


def test_a_tower_cut_applies_where_it_can_and_runs_once_a_clip(tiny_checkpoint, clips, monkeypatch):
    """With --tower-cut, stprune's cells run the tower cut (once a clip for each cut) and fastv's the whole
    tower (shared as before); each answers as `ask` with the same options, and the rows say which cut."""
    qa = VideoQA.from_pretrained(str(tiny_checkpoint))
    options = AskOptions(max_new_tokens=2, tower_cut=0)
    cells = sweep_cells(["none", "fastv", "stprune"], [parse_budget("25%"), parse_budget("10%")], options)
    assert [c.tower_cut for c in cells] == [None, None, None, 0, 0]
    asked = [Question("a", clips["h264"], "what color is the square ?"), Question("b", clips["h264"], "what ?")]
    expected = {(q.id, c.method, c.budget): qa.answer(decode_video(q.video, 8), q.question,
                                                      options_for(c, options)).answer for q in asked for c in cells}
    towers, cut_towers = [], []
    real, cut_features = qa.model.video_features, qa.tower_cutter.features
    monkeypatch.setattr(qa.model, "video_features", lambda *a, **k: towers.append(1) or real(*a, **k))
    monkeypatch.setattr(qa.tower_cutter, "features", lambda *a, **k: cut_towers.append(1) or cut_features(*a, **k))
    run_sweep(qa, asked, cells, options, repeats=2)
    assert len(towers) == 1 + 1 and len(cut_towers) == 2  # the warm-up (none) and the clip; each budget's cut
    assert {(q.id, c.method, c.budget): a for c in cells for q, a in zip(asked, c.answers, strict=True)} == expected
    rows = [c.row(cells[0]) for c in cells]
    assert [r.get("tower_cut") for r in rows] == [None, None, None, 0, 0]
    with pytest.raises(UserError, match="--tower-cut applies to none of --methods none,fastv"):
        sweep_cells(["none", "fastv"], [parse_budget("25%")], options)


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
    # FLOPs as a share of the unpruned prefill: layers 0-1 of 4 see every token, 2-3 only the kept ones.
    shares = [r["prefill_flops_share"] for r in rows]
    assert shares[0] == 1.0 and 0.5 < shares[2] < shares[1] < 1
    assert all(r["answer"] is not None and r["accuracy"] is None for r in rows)
    assert rows[2]["prefill_tflops"] < rows[0]["prefill_tflops"] or rows[0]["prefill_tflops"] == 0
    with open(tmp_path / "sweep.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [r["method"] for r in rows]
    for name in ("accuracy.png", "accuracy_vs_flops.png", "latency.png", "kept-fastv.png", "kept-sparsevlm.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 300
    assert "x prefill" in result.stdout
    (tmp_path / "notes.txt").write_text("mine")  # the user's files in a sweep's folder
    (tmp_path / "kept-mine.png").write_bytes((tmp_path / "kept-fastv.png").read_bytes())
    again = runner.invoke(app, ["sweep", str(clips["h264"]), "what color is the square ?", "--model",
                                str(tiny_checkpoint), "--methods", "uniform", "--budgets", "5%", "--repeats", "1",
                                "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert again.exit_code == 0, again.output
    # Nothing to grade and nothing drawn this time: the first sweep's pictures must not pass for this one's;
    # what the user put beside them stays.
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["kept-mine.png", "latency.png"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sweep_never_writes_into_a_folder_of_the_users(tiny_checkpoint, clips, tmp_path, monkeypatch):
    """A folder that is not empty and was not a sweep's is refused before the model loads, untouched;
    an empty one is taken, and marked as a sweep's."""
    from vidsparse import cli

    theirs = tmp_path / "figures"
    theirs.mkdir()
    for name in ("accuracy.png", "kept-final.png", "notes.txt"):
        (theirs / name).write_bytes(name.encode())
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("loaded the model for a refused folder"))
    sweep = ["sweep", str(clips["h264"]), "what ?", "--model", str(tiny_checkpoint), "--methods", "none,uniform",
             "--budgets", "5%", "--repeats", "1", "--max-new-tokens", "1", "--out"]
    result = runner.invoke(app, [*sweep, str(theirs)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"--out {theirs} is not empty and holds no .vidsparse-sweep" in result.stderr
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    monkeypatch.setattr(cli, "_load", real_load)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(app, [*sweep, str(empty)]).exit_code == 0
    assert sorted(p.name for p in empty.iterdir()) == [".vidsparse-sweep", "accuracy.png", "accuracy_vs_flops.png",
                                                       "latency.png", "sweep.csv", "sweep.json", "sweep.md"]


@pytest.mark.parametrize("budgets, message", [("100%,,10%", "has an empty item"), ("10%,25%,10%", "names 10% twice"),
                                             ("10%,0", "--budgets must be at least 1")])
def test_bad_budget_lists_are_one_line_errors(clips, budgets, message):
    result = runner.invoke(app, ["sweep", str(clips["h264"]), "what ?", "--budgets", budgets])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output


@pytest.mark.parametrize("methods, message", [("none,,fastv", "has an empty item"),
                                             ("none,fastv,none", "names none twice"),
                                             ("fastv,bogus", "unknown method 'bogus'")])
def test_bad_method_lists_are_one_line_errors(clips, methods, message):
    result = runner.invoke(app, ["sweep", str(clips["h264"]), "what ?", "--methods", methods])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_ctrl_c_says_which_rows_are_kept(tiny_checkpoint, clips, tmp_path, monkeypatch):
    from vidsparse import sweep

    real = sweep.run_sweep

    def interrupted_after_two_cells(qa, todo, cells, options, repeats, on_step, on_cell_done, decoded):
        finished = []

        def cell_done():
            on_cell_done()
            finished.append(1)
            if len(finished) == 2:
                raise KeyboardInterrupt

        return real(qa, todo, cells, options, repeats, on_step, cell_done, decoded)

    monkeypatch.setattr(sweep, "run_sweep", interrupted_after_two_cells)
    out = tmp_path / "s"
    result = runner.invoke(app, ["sweep", str(clips["h264"]), "what color is the square ?", "--model",
                                 str(tiny_checkpoint), "--methods", "none,uniform,fastv", "--budgets", "10%",
                                 "--repeats", "1", "--max-new-tokens", "1", "--out", str(out)])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert f"interrupted: the 2 row(s) measured so far are in {out / 'sweep.csv'}" in result.stderr
    assert [r["method"] for r in json.loads((out / "sweep.json").read_text())] == ["none", "uniform"]


def test_sweep_of_one_video_decodes_it_once_and_a_bad_one_fails_before_the_model_loads(tiny_checkpoint, clips,
                                                                                    tmp_path, monkeypatch):
    """An undecodable video used to load the model and run the progress through every cell before
    saying so; now it is one line at once, as in `ask`. A good one is decoded once for every cell."""
    from vidsparse import cli, video

    decodes = []
    real_decode, real_load = video.decode_video, cli._load

    def counting_decode(path, *args, **kwargs):
        decodes.append(path)
        return real_decode(path, *args, **kwargs)

    monkeypatch.setattr(video, "decode_video", counting_decode)
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("loaded the model for an undecodable video"))
    out = tmp_path / "s"
    args = ["what ?", "--model", str(tiny_checkpoint), "--methods", "none,fastv,uniform", "--budgets", "50%,10%",
            "--repeats", "2", "--max-new-tokens", "1", "--out", str(out)]
    result = runner.invoke(app, ["sweep", str(clips["bad_not_video"]), *args])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"error: cannot decode {clips['bad_not_video']}: not a video")
    assert decodes == [clips["bad_not_video"]] and not out.exists()
    monkeypatch.setattr(cli, "_load", real_load)
    decodes.clear()
    assert runner.invoke(app, ["sweep", str(clips["h264"]), *args]).exit_code == 0
    assert decodes == [clips["h264"]]


def test_sweep_a_folder_names_and_skips_a_question_that_cannot_be_asked(tiny_checkpoint, folder, tmp_path):
    """As `batch` records such a question and goes on, a sweep skips it by name; the others are swept."""
    lines = [{"video": "a.mp4", "question": "what color is the square ?", "answer": "red"},
             {"video": "a.mp4", "question": "what is <video> here ?", "id": "tagged"},
             {"video": "b.webm", "question": "  ", "id": "blank"}]
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = runner.invoke(app, ["sweep", str(folder), "--questions", str(questions), "--model", str(tiny_checkpoint),
                                 "--methods", "none", "--budgets", "5%", "--repeats", "1", "--max-new-tokens", "1",
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "skipped: question 'tagged': " in result.stderr and "<video>" in result.stderr
    assert "skipped: question 'blank': the question is empty" in result.stderr
    assert [r["questions"] for r in json.loads((tmp_path / "s" / "sweep.json").read_text())] == [1]


def test_sweep_a_folder_reports_accuracy_and_skips_a_broken_clip(tiny_checkpoint, folder, tmp_path):
    result = runner.invoke(app, ["sweep", str(folder), "--questions", str(folder / "qa.jsonl"), "--model",
                                 str(tiny_checkpoint), "--methods", "none,uniform", "--budgets", "5%",
                                 "--repeats", "1", "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert result.exit_code == 1  # one clip could not be decoded: said, skipped, the rest swept
    assert "skipped: cannot decode " in result.stderr and "broken.mp4" in result.stderr
    assert "Traceback" not in result.output
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["method"], r["questions"]) for r in rows] == [("none", 12), ("uniform", 12)]
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0] == "| method | budget | tokens | equiv. tokens | prefill FLOPs | accuracy | color | is | moves |"
    assert table[2].startswith("| none | - | 136 | 136 | 100.0% |") and len(table) == 4
    assert all(r["accuracy"] is not None and r["answer"] is None for r in rows)


def test_sweep_checks_its_out_folder_before_any_run(tiny_checkpoint, clips, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    result = runner.invoke(app, ["sweep", str(clips["h264"]), "what ?", "--model", str(tiny_checkpoint),
                                 "--out", str(taken)])
    assert result.exit_code == 2 and "exists and is not a folder" in result.stderr
    assert taken.read_text() == "mine"


def test_sweep_refuses_options_it_would_ignore(tiny_checkpoint, clips, folder, tmp_path):
    """Each mistake is one line, and a refused run leaves no (empty) --out folder behind."""
    out = tmp_path / "new" / "sweep-out"  # both folders made by the run, both removed when it is refused
    video = str(clips["h264"])
    model = ["--model", str(tiny_checkpoint), "--out", str(out)]
    cases = [
        ([video, "what ?", "--methods", "uniform,stprune", "--prune-after", "1"], "applies to none of --methods"),
        ([str(folder), "--questions", str(folder / "qa.jsonl"), "--answer", "red"], "--answer is the reference"),
        ([video, "what ?", "--questions", str(folder / "qa.jsonl")], "--questions is for a folder"),
        ([str(tmp_path / "nowhere"), "--questions", str(folder / "qa.jsonl")], "no such video or folder"),
        ([str(folder)], "give a questions file (--questions FILE), or one question"),
        ([video, "what ?", "--methods", ""], "need at least one value"),
        ([video, "what ?", "--frames", "64"], "sample fewer --frames"),
        ([video, "what ?", "--methods", "fastv", "--prune-after", "1,,2"], "layer numbers"),
    ]
    for options, message in cases:
        result = runner.invoke(app, ["sweep", *options, *model])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, (options,
                                                                                                     result.output)
        assert not (tmp_path / "new").exists(), options


def test_sweep_writes_each_finished_cell_before_the_next(tiny_checkpoint, clips, tmp_path, monkeypatch):
    from vidsparse import sweep

    seen = []
    real = sweep.write_tables
    monkeypatch.setattr(sweep, "write_tables", lambda rows, out: seen.append([r["method"] for r in rows])
                        or real(rows, out))
    result = runner.invoke(app, ["sweep", str(clips["h264"]), "what ?", "--model", str(tiny_checkpoint),
                                 "--methods", "fastv,uniform", "--budgets", "20", "--repeats", "2",
                                 "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen[:2] == [["fastv"], ["fastv", "uniform"]]
    assert (tmp_path / "latency.png").exists() and not (tmp_path / "accuracy.png").exists()  # nothing to grade
    assert "accuracy.png" not in result.stdout


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
    # One patch token per frame: the centre of the 4 x 4 grid in frame 0, elsewhere in later frames.
    assert [(t["frame"], t["merged"]) for t in kept] == [(f, False) for f in range(8)]
    assert (kept[0]["row"], kept[0]["col"]) == (2, 2) and all(t["row"] >= 0 for t in kept)
    places = {(t["row"], t["col"]) for t in kept}
    assert len(places) == 8 and len({r for r, _ in places}) == len({c for _, c in places}) == 4
