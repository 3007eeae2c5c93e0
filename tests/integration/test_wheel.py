"""The installed wheel is the product: it holds the shipped models and no lab code, and answers with
`--model shapes-demo` from a folder outside the clone (the models used to be found beside the
checkout, so a non-editable install could not find them at all)."""

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
        for part in ("config.json", "model.safetensors", "tokenizer.json"):
            assert f"vidsparse/shipped/{model}/{part}" in names


def test_an_installed_wheel_answers_with_a_shipped_model_from_anywhere(wheel, clips, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import vidsparse; print(vidsparse.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(target)  # the installed copy, not the clone's
    done = subprocess.run([sys.executable, "-m", "vidsparse", "ask", str(clips["h264"]), "what color is the square ?",
                           "--model", "shapes-demo", "--max-new-tokens", "2", "--json"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["answer"] and stats["tokens"]["visual_before"] == 136  # shapes-demo: 8 frames x 17 tokens
    assert stats["model"]["name"] == "shapes-demo"
