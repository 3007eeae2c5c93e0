"""The command line, through Typer's CliRunner and once as a real subprocess."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vidsparse import cli
from vidsparse.cli import app
from vidsparse.models import loading

runner = CliRunner()


def ask(*args):
    return runner.invoke(app, ["ask", *map(str, args)])


def test_ask_prints_answer_and_stats_table(tiny_checkpoint, clips):
    result = ask(clips["h264"], "what is happening ?", "--model", tiny_checkpoint, "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Answer: ")
    for row in ("visual tokens", "136 (equivalent 136)", "prefill FLOPs", "peak memory", "KV cache", "time: prefill"):
        assert row in result.stdout


def test_ask_says_when_the_budget_prunes_nothing(tiny_checkpoint, clips):
    """The default budget (194, meant for the 7B model's 2056 tokens) is above a small model's 136."""
    pruned = ask(clips["h264"], "what ?", "--model", tiny_checkpoint, "--method", "fastv", "--max-new-tokens", "1",
                 "--budget", "135")
    unpruned = ask(clips["h264"], "what ?", "--model", tiny_checkpoint, "--method", "fastv", "--max-new-tokens", "1")
    assert "136 -> 135" in pruned.stdout and "nothing was pruned" not in pruned.stdout
    assert "136 (equivalent 136): the budget is not below the clip's tokens, nothing was pruned" in unpruned.stdout


def test_ask_json_fields(tiny_checkpoint, clips):
    result = ask(clips["vp9"], "what is happening ?", "--model", tiny_checkpoint, "--json", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert set(stats) == {"answer", "question", "video", "model", "pruning", "tokens", "flops", "memory", "time_ms",
                          "decode_tokens_per_s", "shared"}
    assert stats["video"]["frame_indices"] == [0, 3, 7, 10, 13, 16, 20, 23]
    assert stats["tokens"]["visual_before"] == stats["tokens"]["visual_after"] == 136
    assert stats["tokens"]["text"] == stats["tokens"]["prompt"] - 136
    assert 1 <= stats["tokens"]["generated"] <= 3
    assert set(stats["time_ms"]) == {"decode_video", "preprocess", "vision", "prefill", "pruning", "generate", "total"}
    assert stats["time_ms"]["total"] >= stats["time_ms"]["prefill"] > 0
    # FLOPs from the config (d=64, GQA: keys/values 32 wide, m=256, 4 layers), paper convention, tokens
    # entering each layer.
    n = stats["tokens"]["prompt"]
    assert stats["flops"]["prefill"] == 4 * (2 * n * 64**2 + 2 * n * 64 * 32 + 2 * n * n * 64 + 3 * n * 64 * 256)
    # One question: the head (text + video, up to the last visual token) shares every layer with nobody.
    head = 136 + 3  # <s> "USER:" then the visual block
    assert stats["shared"]["questions"] == 1
    assert stats["shared"]["prefill_flops"] == 4 * (2 * head * 64**2 + 2 * head * 64 * 32 + 2 * head * head * 64
                                                    + 3 * head * 64 * 256)
    assert stats["flops"]["prefill_own"] == stats["flops"]["prefill"] - stats["shared"]["prefill_flops"]
    assert stats["flops"]["amortised"] == stats["flops"]["prefill"] + stats["flops"]["vision"]
    # KV cache: 4 layers x (keys + values) x 2 kv heads x 16 dims x 4 bytes x cached tokens.
    cached = n + stats["tokens"]["generated"] - 1
    memory = stats["memory"]
    assert memory["kv_cache_bytes"] == memory["kv_cache_bytes_unpruned"] == 4 * 2 * 2 * 16 * 4 * cached
    assert stats["memory"]["peak_bytes"] > 0


@pytest.mark.parametrize(
    "video_key, question, message",
    [
        ("bad_missing", "what ?", "video not found"),
        ("bad_directory", "what ?", "is a directory"),
        ("bad_not_video", "what ?", "not a video"),
        ("bad_truncated", "what ?", "corrupt/truncated"),
        ("bad_zero_frames", "what ?", "corrupt/truncated"),
        ("h264", "   ", "question is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, clips, video_key, question, message):
    result = ask(clips[video_key], question, "--model", tiny_checkpoint)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_error_lines_print_brackets_as_they_are(tiny_checkpoint, tmp_path):
    """A path like take[2].mp4 is not console markup: the error names it as it is."""
    result = ask(tmp_path / "take[2] [bold].mp4", "what ?", "--model", tiny_checkpoint)
    assert result.exit_code == 2 and "take[2] [bold].mp4" in result.stderr


def test_folder_that_is_not_a_checkpoint(tmp_path, clips):
    result = ask(clips["h264"], "what ?", "--model", tmp_path)
    assert result.exit_code == 2 and "no config.json" in result.stderr


def test_unknown_model_without_network(clips, monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    result = ask(clips["h264"], "what ?", "--model", "someone/unknown-model")
    assert result.exit_code == 2
    assert "hub cannot be reached" in result.stderr and "--model" in result.stderr


def test_help_shows_examples():
    assert "Example:" in runner.invoke(app, ["--help"]).stdout
    for command in ("ask", "batch", "sweep"):
        assert "Example:" in runner.invoke(app, [command, "--help"]).stdout
        assert runner.invoke(app, [command, "-h"]).stdout == runner.invoke(app, [command, "--help"]).stdout


def test_real_subprocess(tiny_checkpoint, clips):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "vidsparse", "ask", str(clips["av1"]), "what is happening ?",
         "--model", str(tiny_checkpoint), "--json", "--max-new-tokens", "2"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["video"]["backend"] == "pyav" and stats["answer"]
    bad = subprocess.run([sys.executable, "-m", "vidsparse", "ask", str(clips["bad_not_video"]), "what ?"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["ask", "--bogus"], "No such option: --bogus (see python -m vidsparse ask --help)"),
    (["ask"], "Missing argument"),
    (["ask", "clip.mp4", "what ?", "--frames", "abc"], "Invalid value for '--frames'"),
    (["batch", "videos", "--out", "r.jsonl", "--decode-batch", "0"], "Invalid value for '--decode-batch'"),
    (["batch", "videos", "--out", "r.jsonl", "--group-mb", "-1"], "Invalid value for '--group-mb'"),
    (["batch", "videos", "--out", "r.jsonl", "--group-mb", "lots"], "Invalid value for '--group-mb'"),
    (["bogus"], "No such command 'bogus'"),
    # Path('') is the working directory: an unset variable (--out "$OUT") must not write the results there.
    (["sweep", "clip.mp4", "what ?", "--out", ""], "Invalid value for '--out': it is empty"),
    (["batch", "videos", "--out", ""], "Invalid value for '--out': it is empty"),
    (["batch", "videos", "--out", "r.jsonl", "--ray", "localhost"], "--ray localhost: a cluster's address is auto, "
                                                                    "HOST:PORT or ray://HOST:PORT"),
    (["batch", "--ray", "localhost", "videos", "--out", "r.jsonl"], "--ray localhost: a cluster's address is"),
])
def test_usage_mistakes_are_one_line_too(args, message):
    """click's own errors (an unknown option, a value of the wrong type) go through the same one line."""
    done = subprocess.run([sys.executable, "-m", "vidsparse", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1


def test_ask_with_sparsevlm_reports_pruning(tiny_checkpoint, clips):
    result = ask(clips["h264"], "what color is the square ?", "--model", tiny_checkpoint, "--json",
                 "--method", "sparsevlm", "--budget", "20", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    pruning = stats["pruning"]
    assert pruning["method"] == "sparsevlm" and pruning["budget"] == 20 and pruning["stages"] == [1]
    assert pruning["visual_per_stage"] == [136, 20]
    assert set(pruning["raters"].split()) <= {"what", "color", "is", "the", "square", "?", "assistant", ":"}
    # Layers 0-1 see 136 visual tokens, layers 2-3 see 20: equivalent (2 * 136 + 2 * 20) / 4.
    assert stats["tokens"]["equivalent_visual"] == 78
    assert stats["flops"]["prefill"] < stats["flops"]["prefill_unpruned"]
    assert stats["memory"]["kv_cache_bytes"] < stats["memory"]["kv_cache_bytes_unpruned"]
    assert stats["time_ms"]["pruning"] > 0


@pytest.mark.parametrize(
    "options, message",
    [
        (["--budget", "0"], "--budget must be at least 1"),
        (["--budget", "-5"], "--budget must be at least 1"),
        (["--budget", "0%"], "percentage must be in"),
        (["--budget", "lots"], "token count or a percentage"),
        (["--budget", "1_000"], "token count or a percentage"),
        (["--method", "fastv", "--prune-after", "3"], "between 0 and 2"),
        (["--method", "pdrop", "--prune-after", "2,1"], "strictly increasing"),
        (["--method", "pdrop", "--prune-after", "1,x"], "layer numbers"),
        (["--prune-after", "1"], "does not apply to 'none'"),
        (["--method", "tome", "--prune-after", "1"], "it prunes before layer 0 by definition"),
        (["--method", "stprune", "--prune-after", "1"], "it prunes before layer 0 and after layer 1 by definition"),
        (["--method", "magic"], "unknown method"),
        (["--method", "fastv", "--positions", "shuffle"], "authors, keep or compact"),
        (["--method", "fastv", "--budget", "10", "--min-per-frame", "2"], "budget of at least 16"),
        (["--method", "fastv", "--tower-cut", "0"], "(uniform, stprune); what fastv keeps is not known"),
        (["--method", "stprune", "--tower-cut", "2"], "give a layer from 0 to 1"),
        (["--method", "stprune", "--tower-cut", "-1"], "--tower-cut must be a tower layer, 0 or more"),
    ],
)
def test_bad_pruning_options_are_one_line_errors(tiny_checkpoint, clips, options, message):
    result = ask(clips["h264"], "what ?", "--model", tiny_checkpoint, *options)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(("model", "cut", "message"), [
    ("shapes-qwen", "0", "qwen2_5_vl's vision tower cannot be cut"), ("shapes-hd", "3", "give a layer from 0 to 2")])
def test_a_tower_cut_the_checkpoint_cannot_take_is_refused_before_the_video_is_decoded(clips, model, cut, message):
    """From the shipped checkpoint's config alone: the clip here cannot even be decoded."""
    result = ask(clips["bad_truncated"], "what ?", "--model", model, "--method", "stprune", "--tower-cut", cut)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_ask_with_a_tower_cut_says_so_and_counts_the_cut_tower(tiny_checkpoint, clips):
    runs = [ask(clips["h264"], "what ?", "--model", tiny_checkpoint, "--method", "uniform", "--budget", "10",
                "--max-new-tokens", "1", *more) for more in ([], ["--tower-cut", "0"], ["--json"],
                                                             ["--json", "--tower-cut", "0"])]
    assert all(run.exit_code == 0 for run in runs), [run.output for run in runs]
    assert "tower cut" not in runs[0].stdout and "tower cut at layer 0" in runs[1].stdout
    whole, cut = (json.loads(run.stdout) for run in runs[2:])
    assert "tower_cut" not in whole["pruning"] and cut["pruning"]["tower_cut"] == 0
    assert cut["flops"]["vision"] < whole["flops"]["vision"] / 4  # 10 of 136 tokens through every layer


def test_sweep_refuses_a_tower_cut_the_checkpoint_cannot_take_before_loading_it(clips, tmp_path, monkeypatch):
    """`sweep`'s shared options name `none`; the methods it sweeps decide whether a cut is checked."""
    import vidsparse.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the weights were loaded"))
    result = runner.invoke(app, ["sweep", str(clips["h264"]), "what ?", "--model", "shapes-qwen", "--methods",
                                 "none,stprune", "--tower-cut", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "qwen2_5_vl's vision tower cannot be cut" in result.stderr


def test_python_api_takes_prune_after_as_text_a_number_or_a_list():
    from vidsparse.options import ask_options

    assert {ask_options("fastv", prune_after=value).prune_after for value in ("1", 1, [1], (1,))} == {(1,)}
    assert ask_options("pdrop", prune_after="2,6,15").prune_after == ask_options("pdrop", prune_after=[2, 6, 15]
                                                                                 ).prune_after == (2, 6, 15)


def test_budget_as_a_share_of_the_clip(tiny_checkpoint, clips):
    result = ask(clips["h264"], "what ?", "--model", tiny_checkpoint, "--json", "--method", "fastv",
                 "--prune-after", "1", "--budget", "10%", "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["pruning"]["budget"] == 14 and stats["tokens"]["visual_after"] == 14  # round(0.1 x 136)


def test_methods_lists_every_method_with_its_default_stages():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("none", "random", "uniform", "fastv", "pdrop", "tome", "sparsevlm"):
        assert f"│ {name} " in result.stdout
    assert "7, 15, 23" in result.stdout  # PyramidDrop's published stages


@pytest.mark.parametrize(
    ("kind", "model", "types", "method", "at_least"),
    [
        # held out: 99.4% at full budget, 91% with sparsevlm keeping 25%
        ("demo", "shapes-demo", ["color", "shape", "count", "first", "second"], ["--method", "sparsevlm",
                                                                                  "--budget", "50%"], 4),
        # held out: 92.9% at full budget (its EVAL.md)
        ("hd", "shapes-hd", ["color", "shape", "count", "first", "second", "disappears", "moving"], [], 5),
        # recipe N, trained on complete clips only, held out: 91.9% at full budget (its EVAL.md)
        ("hd", "shapes-hd-plain", ["color", "shape", "count", "first", "second", "disappears", "moving"], [], 5),
        # LLaVA-OneVision, held out: 99.6% at full budget (its EVAL.md)
        ("demo", "shapes-ov", ["color", "shape", "count", "first", "second"], ["--method", "stprune",
                                                                                "--budget", "50%"], 4),
        # Qwen2.5-VL, held out: 96.2% at full budget (shape 81%; its EVAL.md), sampled by time as its processor does
        ("demo", "shapes-qwen", ["color", "shape", "count", "first", "second"], ["--fps", "8"], 4),
    ],
)
def test_make_shapes_then_the_shipped_model_answers(tmp_path, kind, model, types, method, at_least):
    out = tmp_path / "shapes"
    made = runner.invoke(app, ["make-shapes", str(out), "--kind", kind, "--n", str(len(types)), "--seed", "31337"])
    assert made.exit_code == 0, made.output
    items = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    assert [i["type"] for i in items] == types
    correct = 0
    for item in items:
        result = ask(out / item["video"], item["question"], "--model", model, "--json", *method)
        assert result.exit_code == 0, result.output
        correct += json.loads(result.stdout)["answer"] == item["answer"]
    assert correct >= at_least


def test_make_shapes_rejects_a_bad_count(tmp_path):
    result = runner.invoke(app, ["make-shapes", str(tmp_path / "x"), "--n", "0"])
    assert result.exit_code == 2 and "--n must be at least 1" in result.stderr


def test_make_shapes_never_writes_over_another_data_set(tmp_path):
    out = tmp_path / "x"
    assert runner.invoke(app, ["make-shapes", str(out), "--n", "3", "--seed", "5"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "00001.mp4").write_bytes(b"")  # damaged: the same data set written again repairs it
    (out / "results.jsonl").write_text("mine")  # what a run over it wrote stays
    again = runner.invoke(app, ["make-shapes", str(out), "--n", "3", "--seed", "5"])
    assert again.exit_code == 0, again.output
    assert (out / "results.jsonl").read_text() == "mine"
    (out / "results.jsonl").unlink()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for other in (["--n", "2", "--seed", "5"], ["--n", "3", "--seed", "6"],
                  ["--n", "3", "--seed", "5", "--kind", "hd"]):
        refused = runner.invoke(app, ["make-shapes", str(out), *other])
        assert refused.exit_code == 2 and "is not empty" in refused.stderr and refused.stderr.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    odd = tmp_path / "m[/x] [red]z"  # rich markup in a user's path is printed as it is
    made = runner.invoke(app, ["make-shapes", str(odd), "--n", "1"])
    assert made.exit_code == 0 and f"{odd}: 1 clips" in made.stdout, made.output
    negative = runner.invoke(app, ["make-shapes", str(tmp_path / "y"), "--seed", "-1"])
    assert negative.exit_code == 2 and "--seed must be 0 or more" in negative.stderr
    assert not (tmp_path / "y").exists()


def test_make_shapes_hd_writes_the_real_geometry_yardstick(tmp_path):
    out = tmp_path / "hd"
    made = runner.invoke(app, ["make-shapes", str(out), "--kind", "hd", "--n", "7", "--seed", "5"])
    assert made.exit_code == 0, made.output
    items = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    assert [i["type"] for i in items] == ["color", "shape", "count", "first", "second", "disappears", "moving"]
    from vidsparse.video import decode_video

    assert decode_video(out / items[0]["video"], 8).frames.shape == (8, 64, 64, 3)
    bad = runner.invoke(app, ["make-shapes", str(out), "--kind", "4k"])
    assert bad.exit_code == 2 and "--kind must be demo or hd" in bad.stderr


def test_a_stdout_that_cannot_be_written_is_one_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "vidsparse", "methods"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.strip() == "error: No space left on device", done.stderr


def test_ctrl_c_that_an_import_turned_into_another_error_exits_130(monkeypatch):
    """transformers' lazy modules re-raise a KeyboardInterrupt during an import as ModuleNotFoundError."""
    def interrupted_import(**kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ModuleNotFoundError("Could not import module 'VideoLlavaForConditionalGeneration'") from e

    monkeypatch.setattr(cli, "app", interrupted_import)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 130

    def broken_import(**kwargs):
        raise ModuleNotFoundError("a real bug")

    monkeypatch.setattr(cli, "app", broken_import)
    with pytest.raises(ModuleNotFoundError):  # not an interrupt: not hidden
        cli.main()
