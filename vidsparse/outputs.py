"""Writing what the user asked for (pictures, tables, folders) safely: every output location is
checked before a model is loaded, and a failure to write is one line, never a traceback."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vidsparse.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_output_file(path: Path, flag: str) -> None:
    """A PNG output file (e.g. --show-kept's) must be writable, and may replace only an earlier PNG
    (a regular file, looked into only then): a slip of the path must never overwrite the video or a
    questions file. Checked before a model is loaded."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name such as {path / 'kept.png'}")
    check_output_dir(path.parent, flag)
    try:
        mode = path.stat().st_mode  # a stat, not an open: opening a FIFO waits for a writer forever
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise UserError(f"{flag} {path} is not a regular file (a pipe, socket or device); give a file name for "
                        "the PNG")
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write {path} ({flag}): the file is read-only")
    try:
        with path.open("rb") as f:
            is_png = f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError as e:
        raise UserError(f"cannot read {path} ({flag}): {e.strerror or e}") from None
    if not is_png:
        raise UserError(f"{flag} {path} exists and is not a PNG picture; it is left alone (give another name)")


def check_output_dir(folder: Path, flag: str) -> None:
    """A folder outputs go to: created if absent, and proven writable by writing a scratch file."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({flag}): {e.strerror or e}") from None


@contextmanager
def new_output_dir(folder: Path, flag: str) -> Iterator[Path]:
    """check_output_dir, and the folder removed again if this call made it and the work in the
    `with` block fails before writing anything into it (no empty folder left by a refused run)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # the folders this call creates
    check_output_dir(folder, flag)
    try:
        yield folder
    except BaseException:
        for created in made:  # innermost first; a folder something was written into stays
            if not created.is_dir() or any(created.iterdir()):
                break
            created.rmdir()
        raise


def save_figure(figure, path: Path) -> None:
    """Save a matplotlib figure as PNG to exactly `path` (no extension added), and close it."""
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110, format="png")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(figure)


def replace_file(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a crash leaves the previous complete version."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)  # a full disk must not leave a stub beside the previous version
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
