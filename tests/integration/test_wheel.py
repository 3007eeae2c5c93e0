"""The installed wheel is the product: it holds the shipped models and no lab code, and, installed in
a fresh virtual environment, its `vidsparse` command answers with `--model shapes-demo` from a folder
outside the clone (the models used to be found beside the checkout, so a non-editable install could
not find them at all)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB_MODULES = {path.stem for path in (ROOT / "lab").glob("*.py")} - {"__init__"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of what the package is made of (pip would leave build/ in the clone)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "vidsparse", source / "vidsparse", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "lab", source / "lab", ignore=shutil.ignore_patterns("__pycache__"))  # must stay out
    (source / "vidsparse" / "shipped" / "shapes-videollava" / "train_state.pt").write_bytes(b"a training run's")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("vidsparse-*.whl")
    return found


def test_the_wheel_holds_the_product_and_the_shipped_models_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"vidsparse", wheel.name.split("-py")[0] + ".dist-info"}
    assert not [name for name in names if Path(name).stem in LAB_MODULES], "training code in the wheel"
    for model in ("shapes-videollava", "shapes-hd-videollava"):
        shipped = {Path(name).name for name in names if name.startswith(f"vidsparse/shipped/{model}/")}
        assert shipped == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json", "EVAL.json", "EVAL.md"}  # never a training run's state


def test_an_installed_wheel_answers_with_a_shipped_model_from_anywhere(wheel, clips, tmp_path):
    """`pip install` of the wheel into a fresh virtual environment (its dependencies seen from this
    one's site-packages: the machine is offline), then its `vidsparse` command, from elsewhere."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    where = subprocess.run([str(python), "-c", "import vidsparse; print(vidsparse.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv)  # the installed copy, not the clone's
    done = subprocess.run([str(venv / "bin" / "vidsparse"), "ask", str(clips["h264"]), "what color is the square ?",
                           "--model", "shapes-demo", "--max-new-tokens", "2", "--json"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["answer"] and stats["tokens"]["visual_before"] == 136  # shapes-demo: 8 frames x 17 tokens
    assert stats["model"]["name"] == "shapes-demo"
    lab = subprocess.run([str(python), "-c", "import lab"], cwd=elsewhere, env=env, capture_output=True, timeout=60,
                         check=False)
    assert lab.returncode != 0  # the lab is not installed
