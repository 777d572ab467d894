"""The one atomic writer and the one exit-code helper shared by every command.

Atomic: data is written to a temporary file in the destination's directory
(``.<name>.lineas-tmp-*``), flushed, then renamed over the destination, so a
reader never sees a half-written file and a killed process leaves at most a
hidden temp file whose name says what it was.  Folders use the same rule in
:mod:`bake.formats.export` (temporary sibling, then rename).
"""

from __future__ import annotations

import enum
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_MARK = ".lineas-tmp-"


class ExitCode(enum.IntEnum):
    """Process exit codes of ``lineas-train`` and ``lineas-bake`` (documented in their ``--help``)."""

    OK = 0
    FAIL = 1          # a failure that is not the user's input (Hub errors, numerical blow-up in training)
    BAD_INPUT = 2     # bad arguments, files, models or maps: the message names the offending value
    VERIFY = 3        # lineas-bake: the baked model does not reproduce the hooked model


def fail(prog: str, msg: str, code: ExitCode | int = ExitCode.BAD_INPUT) -> int:
    """Print ``<prog>: error: <msg>`` (one line per message line) to stderr and return ``code``."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return int(code)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it to ``path``.

    The temp file is removed if ``write`` raises (or the process is interrupted by an exception).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KB`` (binary units), for messages about file and disk sizes."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def writable_anchor(path: str | os.PathLike) -> Path:
    """The nearest existing folder above ``path`` (where writing ``path`` would create what is missing),
    checked by creating and removing a probe in it: ``os.access`` says yes for root on read-only file
    systems.  Raises ``ValueError`` naming the folder when it is a file or cannot be written; leaves
    nothing on disk."""
    anchor = Path(path).expanduser().absolute().parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ValueError(f"{str(anchor)!r} is a file, so no folder can be created under it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lineas-probe-", dir=anchor))
    except OSError as e:
        raise ValueError(f"cannot write in {str(anchor)!r} ({e.strerror or e})") from None
    return anchor
