"""Every bench script and lab entry point answers --help (a `%` in a help string once made argparse
raise instead)."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def entry_points(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.py") if 'if __name__ == "__main__":' in path.read_text())


def assert_usage(run, monkeypatch, capsys, argv0: str) -> None:
    monkeypatch.setattr("sys.argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("script", entry_points(BENCH), ids=lambda path: path.name)
def test_bench_script_help(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    assert_usage(lambda: runpy.run_path(str(script), run_name="__main__"), monkeypatch, capsys, str(script))


# One lab module imports another (read_depth -> stprune_ablation): runpy warns that it ran one already imported.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", [f"lab.{path.stem}" for path in entry_points(ROOT / "lab")])
def test_lab_module_help(module, monkeypatch, capsys):
    assert_usage(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), monkeypatch, capsys, module)
