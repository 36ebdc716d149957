"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Temporary files and folders are created private (``mkstemp``: 0600, ``mkdtemp``: 0700); before they take their
final name they get the modes a plain ``open`` / ``mkdir`` would give under the process umask (0644 / 0755
under umask 022), so colleagues on a shared cluster can read what a run wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux), else by a quick set/restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_mode(path: PathLike) -> None:
    """Give ``path`` the mode ``open``/``mkdir`` would have given it: 0666 / 0777 less the umask."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def apply_default_modes_under(folder: PathLike) -> None:
    """:func:`apply_default_mode` on ``folder`` and everything in it (libraries that save through private
    temporary files, e.g. ``transformers``' ``save_pretrained``, leave 0600 files behind)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                apply_default_mode(path)
    apply_default_mode(folder)


def make_temp_dir(parent: PathLike, name: str) -> Path:
    """A private scratch folder beside a final folder ``parent/name``; call :func:`apply_default_mode` before renaming."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        apply_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (unicode kept as is) to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)
