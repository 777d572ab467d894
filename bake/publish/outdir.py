"""The output folder: checked before any work, written through a temporary sibling, never left half-done.

* :func:`check_out_dir` runs before the model is loaded: the folder must not be
  the working directory (or contain it, or contain the model being baked), its
  nearest existing ancestor must be a writable directory, and that file system
  must have room for the estimated export (:func:`bake.formats.kinds.export_bytes`).
* :func:`temp_folder` creates ``lineas_tmp_<pid>_<random>`` next to the output,
  with an owner marker; SIGTERM during the export becomes :class:`Terminated`, so
  the ``except`` that removes the temporary folder runs.  SIGKILL cannot be
  caught: the next export into the same parent removes temporary folders whose
  owner process is gone, and puts back a previous output that a killed
  ``--overwrite`` had moved aside (:func:`remove_stale`).
* :func:`move_into_place` renames the finished folder over the output, putting an
  old output aside (``lineas_old_<pid>_*``) first and restoring it on failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from bake.errors import BakeError, OutputExistsError
from lineas.io import human_size, writable_anchor

log = logging.getLogger(__name__)

TMP_PREFIX = "lineas_tmp_"
OLD_PREFIX = "lineas_old_"
OWNER_FILE = ".lineas_owner.json"
# Temp folder names become Python module names when transformers imports remote code from them:
# letters, digits and underscores only (mkdtemp's random part uses the same alphabet).
_OWNED = re.compile(rf"^(?:{TMP_PREFIX}|{OLD_PREFIX})(\d+)_\w+$")


class OutputPathError(BakeError, ValueError):
    """``--out`` cannot be written: a file in its path, a read-only folder, too little space, or a folder
    that must not be replaced (the working directory, the model's own folder)."""


class Terminated(BaseException):
    """SIGTERM arrived during an export (a BaseException, so no ``except Exception`` swallows it)."""


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, *, model_dir: str | os.PathLike | None = None,
                  needed_bytes: int | None = None) -> Path:
    """Validate ``out_dir`` before any work; returns it as a Path. Raises :class:`OutputPathError` /
    :class:`bake.errors.OutputExistsError` naming the folder and the reason."""

    out = Path(out_dir).expanduser()
    full = out.resolve()
    cwd = Path.cwd().resolve()
    if full == cwd or full in cwd.parents:
        raise OutputPathError(f"--out {str(out)!r} is the current directory or contains it; an export replaces "
                              "its --out folder as a whole, so give a new folder (e.g. --out ./NAME-steered)")
    if model_dir is not None and Path(model_dir).expanduser().is_dir():
        model = Path(model_dir).expanduser().resolve()
        if full == model or full in model.parents:
            raise OutputPathError(f"--out {str(out)!r} is or contains the model folder {str(model_dir)!r}; "
                                  "write the export to a new folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {str(out)!r} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    try:
        anchor = writable_anchor(full)
    except ValueError as e:
        raise OutputPathError(f"--out {str(out)!r}: {e}") from None
    if needed_bytes:
        free = shutil.disk_usage(anchor).free
        if free < needed_bytes:
            raise OutputPathError(f"--out {str(out)!r}: the export needs about {human_size(needed_bytes)} but "
                                  f"only {human_size(free)} is free on the file system of {anchor}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove ``lineas_tmp_<pid>_*`` / ``lineas_old_<pid>_*`` folders in ``parent`` whose owner process (on
    this host) is gone; report, but keep, ones we cannot attribute. Returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if not p.is_dir() or not p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            continue
        m = _OWNED.match(p.name)
        owner = _read_owner(p)
        if m is None or (owner is not None and owner.get("host") != socket.gethostname()):
            log.warning("leftover folder %s from an interrupted lineas-bake run (owner unknown or on another "
                        "host); remove it by hand if no export is running there", p)
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if _restore_old_output(p, owner):
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed %s: left behind by lineas-bake process %d, which is no longer running", p, pid)
        removed.append(p)
    return removed


def _restore_old_output(folder: Path, owner: dict | None) -> bool:
    """A run killed between the two renames of :func:`move_into_place` left the previous output in
    ``lineas_old_*/old`` and no output at all: put the previous output back instead of deleting it."""
    old = folder / "old"
    target = Path(owner["out"]) if owner and owner.get("out") else None
    if not folder.name.startswith(OLD_PREFIX) or not old.is_dir() or target is None or target.exists():
        return False
    os.replace(old, target)
    shutil.rmtree(folder, ignore_errors=True)
    log.warning("restored %s from %s: the run replacing it was killed before it finished", target, folder)
    return True


def _read_owner(folder: Path) -> dict | None:
    try:
        return json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _owned_mkdtemp(prefix: str, out: Path) -> Path:
    """``<prefix><pid>_<random>`` next to ``out``, with a marker naming its process, host and output."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}_", dir=out.parent))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "out": str(out.resolve())}
    (folder / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    return folder


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (main thread only; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def temp_folder(out: Path) -> Path:
    """A new ``lineas_tmp_<pid>_*`` folder next to ``out`` (after removing stale ones of dead runs)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)
    return _owned_mkdtemp(TMP_PREFIX, out)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is put aside first and restored if the rename fails."""
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = _owned_mkdtemp(OLD_PREFIX, out)
    try:
        os.replace(out, trash / "old")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash / "old", out)
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
