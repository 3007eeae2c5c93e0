"""`vidsparse batch --ray` on a real local Ray cluster with the shipped demo model: the answers of the
single-process batch, a killed worker loses and repeats nothing, a killed driver resumes, a clip that
cannot be decoded is an error record, and the single-process path never imports Ray."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from tests.conftest import kill_9_after
from vidsparse import ray_batch
from vidsparse.batch import batch_settings, clip_jobs, run_batch
from vidsparse.cli import app
from vidsparse.datasets.shapes import make_shapes
from vidsparse.errors import UserError
from vidsparse.metrics import Tally
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA
from vidsparse.questions import load_questions
from vidsparse.ray_batch import LOCAL, WorkerPool, placement
from vidsparse.results import ResultsFile

runner = CliRunner()
MODEL = "shapes-demo"
OPTIONS = ask_options("sparsevlm", "25%", None, "keep", 0, 0, 8, "auto", 8)
EXTRA = ["how many objects are there ?", "describe the objects ?"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """8 ShapesQA clips with 3 questions each, and a clip that cannot be decoded (2 questions)."""
    root = tmp_path_factory.mktemp("ray") / "clips"
    make_shapes(root, 8, seed=31)
    lines = [json.loads(line) for line in (root / "qa.jsonl").read_text().splitlines()]
    more = [{"video": line["video"], "question": q, "id": f"{line['id']}-{i}"}
            for line in lines for i, q in enumerate(EXTRA)]
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    broken = [{"video": "broken.mp4", "question": q, "id": f"broken-{i}"} for i, q in enumerate(EXTRA)]
    (root / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines + more + broken))
    return root


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory) -> dict[str, dict]:
    """The single-process batch's records, by id."""
    out = tmp_path_factory.mktemp("single") / "r.jsonl"
    qa = VideoQA.from_pretrained(MODEL, dtype="float32", device="cpu")
    with ResultsFile.open(out, batch_settings(MODEL, "float32", "cpu", OPTIONS)) as results:
        run_batch(qa, clip_jobs(load_questions(clips, clips / "qa.jsonl", None)), clips, results, OPTIONS, Tally())
    return {r["id"]: r for r in results.latest_records()}


def ray_run(clips: Path, out: Path, on_record=lambda record: None) -> list[dict]:
    """The records of a `batch --ray` run of the clips; `on_record` sees each one once it is written."""
    questions = load_questions(clips, clips / "qa.jsonl", None)
    with WorkerPool.start(LOCAL, 2, MODEL, "float32", "cpu") as pool:
        settings = pool.settings(OPTIONS)
        assert settings == batch_settings(MODEL, "float32", "cpu", OPTIONS)
        with ResultsFile.open(out, settings) as results:
            append = results.append
            results.append = lambda record: (append(record), on_record(record))
            pool.run(clip_jobs(questions), clips, results, OPTIONS, Tally(), lambda: None, decode_batch=16)
            return list(results.latest_records())


def same_answers(records: list[dict], reference: dict[str, dict], same_sharing: bool = True) -> None:
    """Every question once, with the reference's answer, error, tokens and FLOPs. `same_sharing=False`:
    a clip cut by a killed driver is resumed with fewer questions sharing its work, so only the
    amortised FLOPs may differ."""
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(reference) == 26  # nothing lost, nothing twice
    for r in records:
        ref = reference[r["id"]]
        flops, ref_flops = dict(r.get("flops", {})), dict(ref.get("flops", {}))
        if not same_sharing:
            flops.pop("amortised", None), ref_flops.pop("amortised", None)
        assert (r.get("answer"), r.get("error"), r.get("tokens"), flops) == (
            ref.get("answer"), ref.get("error"), ref.get("tokens"), ref_flops), r["id"]
        assert r["question"] == ref["question"] and r.get("correct") == ref.get("correct")


def test_workers_give_the_single_process_answers(cluster, clips, reference, tmp_path):
    records = ray_run(clips, tmp_path / "r.jsonl")
    same_answers(records, reference)
    assert {r["worker"]["index"] for r in records} == {0, 1}  # both workers answered
    assert all(r["worker"]["host"] and r["worker"]["attempt"] == 1 for r in records)
    broken = [r for r in records if r["id"].startswith("broken")]
    assert len(broken) == 2 and all("broken.mp4" in r["error"] for r in broken)
    shared = [r["shared"]["questions"] for r in records if "error" not in r]
    assert min(shared) == 3  # a clip's questions still share its work on the worker


def test_a_killed_worker_loses_and_repeats_nothing(cluster, clips, reference, tmp_path):
    killed: list[int] = []

    def kill_first_worker(record: dict) -> None:
        if not killed:  # that worker still has its second clip queued: it dies with it
            killed.append(record["worker"]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    records = ray_run(clips, tmp_path / "r.jsonl", kill_first_worker)
    same_answers(records, reference)
    retried = [r for r in records if r["worker"]["attempt"] == 2]
    assert retried and all(r["worker"]["pid"] != killed[0] for r in retried)
    assert max(r["worker"]["index"] for r in records) == 2  # the replacement worker


def test_a_clip_whose_workers_keep_dying_becomes_error_records(cluster, clips, reference, tmp_path, monkeypatch):
    """With one attempt allowed, the clips lost with a killed worker are recorded as errors, once."""
    monkeypatch.setattr(ray_batch, "MAX_ATTEMPTS", 1)
    killed: list[int] = []

    def kill_first_worker(record: dict) -> None:
        if not killed:
            killed.append(record["worker"]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    records = ray_run(clips, tmp_path / "r.jsonl", kill_first_worker)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(reference)
    died = [r for r in records if "a worker died answering this clip, 1 attempt(s)" in r.get("error", "")]
    assert died and all(r["worker"] is None for r in died)
    questions_of = {}  # each clip's question ids (the broken clip has 2, the others 3)
    for line in (clips / "qa.jsonl").read_text().splitlines():
        item = json.loads(line)
        questions_of.setdefault(item["video"], set()).add(item["id"])
    died_ids = {r["id"] for r in died}
    assert all(ids <= died_ids or not ids & died_ids for ids in questions_of.values())  # whole clips
    same_answers([r for r in records if r not in died] + [reference[r["id"]] for r in died], reference)


def test_a_question_for_every_clip_that_cannot_be_asked_is_refused_once(cluster, clips, tmp_path):
    """As in the single-process batch: a bad --question is the user's mistake, refused before any
    clip is sent, not one error record per clip that --retry-errors could never fix."""
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["batch", str(clips), "--question", "what <video> ?", "--out", str(out),
                                 "--model", MODEL, "--ray", "--workers", "1"])
    assert result.exit_code == 2 and "special token" in result.output, result.output
    assert result.output.count("\n") == 1 and not out.exists()


def test_a_killed_driver_resumes(clips, reference, tmp_path):
    """kill -9 of the driver mid-run, then the same command: every question once, the same answers."""
    out = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "vidsparse", "batch", str(clips), "--questions", str(clips / "qa.jsonl"),
               "--out", str(out), "--model", MODEL, "--dtype", "float32", "--device", "cpu", "--method", "sparsevlm",
               "--budget", "25%", "--max-new-tokens", "8", "--ray", "--workers", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    written = kill_9_after(command, out, 2, timeout_s=240)
    assert 2 <= len(written) < 27, "the run should have been killed part-way"
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 1, done.stderr  # 1: the broken clip's questions failed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in written] == lines[: len(written)]  # old results untouched
    same_answers(lines[1:], reference, same_sharing=False)


def test_the_single_process_batch_never_imports_ray(clips, tmp_path):
    code = (
        "import sys; from typer.testing import CliRunner; from vidsparse.cli import app; "
        f"r = CliRunner().invoke(app, ['batch', {str(clips)!r}, '--question', 'what ?', '--out', "
        f"{str(tmp_path / 'r.jsonl')!r}, '--model', 'shapes-demo', '--max-new-tokens', '2']); "
        "assert r.exit_code == 1, r.output; assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_without_ray_one_line_says_how_to_install_it(clips, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = runner.invoke(app, ["batch", str(clips), "--question", "what ?", "--out", str(tmp_path / "r.jsonl"),
                                 "--model", MODEL, "--ray"])
    assert result.exit_code != 0 and "pip install 'vidsparse[ray]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("flags, address", [
    (["--ray"], LOCAL), (["--ray", "--workers", "2"], LOCAL), (["--ray", "auto"], "auto"),
    (["--ray", "ray://head:10001"], "ray://head:10001"), (["--ray", "10.0.0.1:6379"], "10.0.0.1:6379"),
])
def test_ray_takes_an_optional_address(clips, tmp_path, monkeypatch, flags, address):
    def start(address, workers, *args):
        raise UserError(f"would join {address} with {workers} workers")

    monkeypatch.setattr(WorkerPool, "start", staticmethod(start))
    result = runner.invoke(app, ["batch", "--out", str(tmp_path / "r.jsonl"), *flags, str(clips),
                                 "--question", "what ?", "--model", MODEL])
    assert result.exit_code == 2 and f"would join {address} with" in result.output, result.output


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{free}", "nothing answers at 127.0.0.1:{free} (Connection refused)"),
    ("ray://127.0.0.1:{free}", "nothing answers at 127.0.0.1:{free} (Connection refused)"),
    ("ray://head", "expected 'auto' or HOST:PORT or ray://HOST:PORT"),
])
def test_an_address_where_nothing_answers_is_one_line_at_once(clips, tmp_path, monkeypatch, address, message):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a new process (the module's cluster runs here)
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["batch", str(clips), "--question", "what ?", "--out", str(out),
                                 "--model", MODEL, "--ray", address.format(free=free)])
    assert result.exit_code == 2 and message.format(free=free) in result.output, result.output
    assert result.output.count("\n") == 1 and not out.exists()


def test_workers_need_ray(clips, tmp_path):
    result = runner.invoke(app, ["batch", str(clips), "--question", "what ?", "--out", str(tmp_path / "r.jsonl"),
                                 "--model", MODEL, "--workers", "2"])
    assert result.exit_code == 2 and "--workers needs --ray" in result.output


def test_placement_one_worker_per_gpu_or_a_share_of_the_cores():
    assert placement({"CPU": 32, "GPU": 4}, None, "auto") == placement({"CPU": 8, "GPU": 4}, 4, "cuda")
    assert placement({"CPU": 32, "GPU": 4}, None, "auto").workers == 4
    assert placement({"CPU": 32, "GPU": 4}, None, "auto").gpus == 1
    with pytest.raises(UserError, match="4 GPU"):
        placement({"CPU": 32, "GPU": 4}, 5, "auto")
    cpu = placement({"CPU": 16, "GPU": 4}, 4, "cpu")  # --device cpu: CPU workers even beside GPUs
    assert (cpu.workers, cpu.gpus, cpu.cpus, cpu.threads) == (4, 0, 4.0, 4)
    assert placement({"CPU": 2}, None, "auto").workers == 1
    small = placement({"CPU": 2}, 4, "auto")  # more workers than cores: they share them
    assert (small.cpus, small.threads) == (0.5, 1)


@pytest.mark.parametrize(("differs", "hint"), [({"weights": "0123456789abcdef"}, "same checkpoint"),
                                               ({"dtype": "bfloat16"}, "give --dtype explicitly")])
def test_workers_that_resolve_different_settings_are_refused_naming_them(differs, hint):
    """One results file holds one model's answers: workers on machines with other weights under the same
    model name (or another default dtype) are refused before anything is answered."""
    from types import SimpleNamespace

    from vidsparse.ray_batch import WorkerPool

    base = {"model": "m", "weights": "fedcba9876543210", "dtype": "float32"}

    def actor(settings):
        return SimpleNamespace(settings=SimpleNamespace(remote=lambda options, question: settings))

    pool = WorkerPool.__new__(WorkerPool)
    pool.ray = SimpleNamespace(get=list, exceptions=SimpleNamespace(RayActorError=RuntimeError))
    pool.actors = {0: actor(base), 1: actor(base | differs)}
    with pytest.raises(UserError, match=rf"different settings \({next(iter(differs))}\): .*{hint}"):
        pool.settings(None)
    pool.actors = {0: actor(base), 1: actor(dict(base))}
    assert pool.settings(None) == base
