"""File names from data, and writes that stay inside their folder.

Names that come from data (a results file's ``config.model``, a task name, a method name) become file names
only through :func:`safe_name`, and every write of a file the package names goes through :func:`write_inside`,
which refuses a target that is, or resolves through a symbolic link to, anything outside the folder. A
results file whose model is ``../../../../tmp/x_fastv`` or ``/etc/x`` thus names a file inside the output
folder, never a path out of it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SAFE = re.compile(r"[^A-Za-z0-9._+=@-]")
MAX_NAME = 200


def safe_name(text: object) -> str:
    """``text`` as one file name: every character but ``A-Za-z0-9._+=@-`` becomes ``_`` (so no ``/``, ``\\``,
    NUL or control character), leading dots are dropped (no ``..``, no hidden file), at most 200 characters."""
    name = SAFE.sub("_", str(text)).lstrip(".")[:MAX_NAME]
    return name or "_"


def path_inside(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a plain file name (what :func:`safe_name` returns), refused with ``ValueError``
    when ``name`` is not one or when the target is a symbolic link or resolves outside ``folder``."""
    folder = Path(folder)
    if name != safe_name(name):
        raise ValueError(f"{name!r}: not a plain file name; pass it through lmms_prune.leaderboard.paths.safe_name")
    target = folder / name
    if target.is_symlink():
        raise ValueError(f"{target}: a symbolic link (to {os.readlink(target)}); refusing to write through it, "
                         "remove it or choose another output folder")
    if target.resolve().parent != folder.resolve():
        raise ValueError(f"{target}: resolves outside {folder}; refusing to write there")
    return target


def write_inside(folder: str | Path, name: str, data: str | bytes) -> Path:
    """Write ``data`` to ``folder / name`` (created if needed) after :func:`path_inside`; the file is opened
    with ``O_NOFOLLOW``, so a link put there in the meantime is not followed either. Returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = path_inside(folder, name)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return target
