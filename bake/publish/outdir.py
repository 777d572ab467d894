"""The output folder: checked before any work, claimed for the run, written through a temporary sibling,
placed by a rename that replaces nothing it did not check (for users: docs/guides/output-folder.md).

* :func:`check_out_dir` runs before the model is loaded: ``--out`` is resolved through symlinks (a dangling
  one is refused); it must not be the working directory (or contain it), nor be, contain or lie inside
  anything the model reads (its folder, and the real path of every file in it: Hugging Face cache
  snapshot files are symlinks to blobs); its nearest existing ancestor must be a writable directory with
  room for the estimated export.  What it found there (absent, an empty folder, or a folder by
  ``st_dev``/``st_ino``) is recorded: that is what the final rename may replace, and nothing else.
* A lock (``fcntl.flock`` on ``.<name>.lineas-lock`` in ``--out``'s parent) claims ``--out``: taken when the
  temporary folder is created, or at the first check inside :func:`run_scope` (the CLI's whole run), and
  removed when the export is placed or given up.  A second run into the same ``--out`` is refused (exit 2).
* :func:`temp_folder` creates ``lineas_tmp_<pid>_<random>`` next to the output, with an owner marker;
  SIGTERM in :func:`sigterm_raises` becomes :class:`Terminated`, so the temporary folder is removed.  After
  a SIGKILL, the next export into the same parent removes folders of dead runs and puts back an output a
  killed ``--overwrite`` had moved aside (:func:`remove_stale`).
* :func:`move_into_place` gives the folder and its files the modes the umask gives new ones, then renames
  it into place: with ``renameat2(RENAME_NOREPLACE)`` where nothing was; over the empty folder that was
  checked only while it is still empty; with ``--overwrite``, after moving aside the very folder checked
  (same inode, verified after the move), restoring it if the last rename fails.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bake.errors import BakeError, OutputExistsError
from lineas.io import (
    LockBusy,
    follow_umask,
    human_size,
    identity,
    lock_file,
    lock_path_for,
    name_too_long,
    pid_alive,
    probe_lock,
    rename_noreplace,
    resolved_entries,
    sigterm_raises_once,
    unlock_file,
    writable_anchor,
)

log = logging.getLogger(__name__)

TMP_PREFIX = "lineas_tmp_"
OLD_PREFIX = "lineas_old_"
OWNER_FILE = ".lineas_owner.json"
MODEL_FILES_LIMIT = 100_000  # files of a model folder resolved for the --out check (a checkpoint has a few dozen)
# Temp folder names become Python module names when transformers imports remote code from them:
# letters, digits and underscores only (mkdtemp's random part uses the same alphabet).
_OWNED = re.compile(rf"^(?:{TMP_PREFIX}|{OLD_PREFIX})(\d+)_\w+$")


class OutputPathError(BakeError, ValueError):
    """``--out`` cannot be written: a file in its path, a read-only folder, too little space, or a folder
    that must not be replaced (the working directory, the model's own folder)."""


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, *, model_dir: str | os.PathLike | None = None,
                  needed_bytes: int | None = None) -> Path:
    """Validate ``out_dir`` before any work; returns it as a Path (as given, ``~`` expanded) and records what
    is there (:func:`move_into_place` replaces that and nothing else).  Raises :class:`OutputPathError` /
    :class:`bake.errors.OutputExistsError` naming the folder and the reason."""
    out = Path(out_dir).expanduser()
    shown = str(out_dir)
    if "\0" in shown:
        raise OutputPathError(f"--out {shown!r} contains a NUL character")
    if out.is_symlink() and not out.exists():
        raise OutputPathError(f"--out {shown!r} is a symlink to {os.readlink(out)!r}, which does not exist; "
                              "give a folder path")
    full = out.resolve()
    cwd = Path.cwd().resolve()
    if full == cwd or full in cwd.parents:
        raise OutputPathError(f"--out {shown!r} is the current directory or contains it; an export replaces "
                              "its --out folder as a whole, so give a new folder (e.g. --out ./NAME-steered)")
    claim = _CLAIMS.get(_key(out))
    reads = model_paths(model_dir) | (claim.model_reads if claim is not None else frozenset())
    _check_not_model(shown, full, model_dir, reads)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {shown!r} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {shown!r} exists and is not empty (pass --overwrite to replace it)")
    try:
        anchor = writable_anchor(full)
    except ValueError as e:
        raise OutputPathError(f"--out {shown!r}: {e}") from None
    too_long = name_too_long(full, anchor)
    if too_long:
        raise OutputPathError(f"--out {shown!r}: {too_long}")
    if needed_bytes:
        free = shutil.disk_usage(anchor).free
        if free < needed_bytes:
            raise OutputPathError(f"--out {shown!r}: the export needs about {human_size(needed_bytes)} but "
                                  f"only {human_size(free)} is free on the file system of {anchor}")
    _record(out, shown, full, reads)
    return out


def model_paths(model_dir: str | os.PathLike | None) -> frozenset[Path]:
    """What a model folder makes the bake read, as real paths: the folder and everything in it, resolved
    through symlinks (a Hugging Face cache snapshot's files are symlinks to ``../../blobs/<hash>``)."""
    if model_dir is None or not Path(model_dir).expanduser().is_dir():
        return frozenset()
    return frozenset(resolved_entries(Path(model_dir).expanduser(), MODEL_FILES_LIMIT))


def _check_not_model(shown: str, full: Path, model_dir, reads: frozenset[Path]) -> None:
    """``full`` (--out, resolved) must not be, contain or lie inside anything the model reads."""
    for p in sorted(reads):
        if full == p or full in p.parents or p in full.parents:
            if model_dir is not None and p in (Path(model_dir).expanduser().resolve(),
                                               Path(model_dir).expanduser().absolute()) and p not in full.parents:
                raise OutputPathError(f"--out {shown!r} is or contains the model folder {str(model_dir)!r}; "
                                      "write the export to a new folder")
            how = "is" if full == p else "contains" if full in p.parents else "lies inside"
            raise OutputPathError(f"--out {shown!r} (really {str(full)!r}) {how} {str(p)!r}, which the model "
                                  "reads; write the export to a new folder outside the model's files")


# ----------------------------------------------------------------------------- claiming --out
@dataclass
class _Claim:
    """What :func:`check_out_dir` found at ``--out`` and the lock that keeps other runs away from it."""

    shown: str  # --out as given, for messages
    real: Path  # --out resolved through symlinks at the first check: the path written
    state: tuple[int, int] | None  # (st_dev, st_ino) of the folder found there; None: nothing was there
    empty: bool  # the folder found was empty (then only an empty folder is replaced)
    model_reads: frozenset[Path] = frozenset()
    lock_fd: int | None = None
    lock_path: Path | None = None
    pinned: bool = False  # locked since an earlier check: a later check must find the same thing


_CLAIMS: dict[Path, _Claim] = {}
_RUN_DEPTH = [0]
_EXPORT_SCOPES: list[list[_Claim]] = []


def _key(out: Path) -> Path:
    return Path(os.path.abspath(out))


def _found(real: Path) -> tuple[tuple[int, int] | None, bool]:
    state = identity(real)
    return state, state is not None and real.is_dir() and not any(real.iterdir())


def _record(out: Path, shown: str, real: Path, reads: frozenset[Path]) -> _Claim:
    claim = _CLAIMS.get(_key(out))
    if claim is None:
        claim = _CLAIMS[_key(out)] = _Claim(shown, real, *_found(real), model_reads=reads)
    else:
        claim.model_reads = reads
        if claim.pinned and _found(claim.real) != (claim.state, claim.empty):
            raise OutputExistsError(f"--out {shown!r} changed since it was checked at the start of this run "
                                    "(another program wrote to it); nothing was replaced")
        if not claim.pinned:
            claim.real, (claim.state, claim.empty) = real, _found(real)
    if claim.lock_fd is None:
        if _RUN_DEPTH[0] and claim.real.parent.is_dir():
            _lock(claim)
            claim.pinned = True
        elif (holder := probe_lock(lock_path_for(claim.real))) is not None:  # refused now; creates nothing
            raise _busy(claim, lock_path_for(claim.real), holder)
    return claim


def _busy(claim: _Claim, path: Path, holder: str) -> OutputPathError:
    return OutputPathError(f"--out {claim.shown!r} is being written by another lineas-bake run (process "
                           f"{holder}, lock file {str(path)!r}); wait for it to finish or choose another --out")


def _lock(claim: _Claim) -> None:
    path = lock_path_for(claim.real)
    try:
        claim.lock_fd, claim.lock_path = lock_file(path), path
    except LockBusy as e:
        raise _busy(claim, path, e.holder) from None
    except OSError as e:
        raise OutputPathError(f"--out {claim.shown!r}: cannot create its lock file {str(path)!r} "
                              f"({e.strerror or e})") from None


def _release(claim: _Claim) -> None:
    if claim.lock_fd is not None and claim.lock_path is not None:
        unlock_file(claim.lock_fd, claim.lock_path)
    claim.lock_fd = claim.lock_path = None
    for k in [k for k, c in _CLAIMS.items() if c is claim]:
        del _CLAIMS[k]


@atexit.register
def _release_all() -> None:
    for claim in list(_CLAIMS.values()):
        _release(claim)


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """One run of a command: an ``--out`` checked inside is locked from that first check to the end of the
    block (not only while its export is written), and what the check found there must still be there
    when the export is placed."""
    _RUN_DEPTH[0] += 1
    try:
        yield
    finally:
        _RUN_DEPTH[0] -= 1
        if not _RUN_DEPTH[0]:
            _release_all()


def _claim_for(out: Path) -> _Claim:
    """The claim of ``out`` (made now, from what is there, for a caller that did not check it)."""
    claim = _CLAIMS.get(_key(Path(out).expanduser()))
    if claim is None:
        out = Path(out).expanduser()
        claim = _record(out, str(out), out.resolve(), frozenset())
    return claim


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
        if pid == os.getpid() or pid_alive(pid):
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
    rename_noreplace(old, target)
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
    try:
        (folder / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    except BaseException:  # a disk that fills right here: no nameless leftover for the next run to guess at
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """The block that writes one export: SIGTERM raises :class:`Terminated` in it (main thread only; elsewhere
    signals cannot be set), and the claim of an output whose temporary folder was made in it ends with it
    (outside a :func:`run_scope`)."""
    _EXPORT_SCOPES.append([])
    try:
        with sigterm_raises_once():
            yield
    finally:
        for claim in _EXPORT_SCOPES.pop():
            if not _RUN_DEPTH[0]:
                _release(claim)


def temp_folder(out: Path) -> Path:
    """A new ``lineas_tmp_<pid>_*`` folder next to ``out`` (after removing stale ones of dead runs), once
    ``out``'s lock is held and what its check found is still there."""
    claim = _claim_for(out)
    claim.real.parent.mkdir(parents=True, exist_ok=True)
    if claim.lock_fd is None:
        _lock(claim)
    if _EXPORT_SCOPES:
        _EXPORT_SCOPES[-1].append(claim)
    _check_unchanged(claim)
    remove_stale(claim.real.parent)
    return _owned_mkdtemp(TMP_PREFIX, claim.real)


def _check_unchanged(claim: _Claim) -> None:
    if identity(claim.real) != claim.state:
        what = "appeared" if claim.state is None else "was replaced or removed"
        raise OutputExistsError(f"--out {claim.shown!r} {what} since it was checked (another program wrote "
                                "there); nothing was replaced")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing only what :func:`check_out_dir` found there: nothing
    (``renameat2(RENAME_NOREPLACE)``), an empty folder (only while it is still empty), or with ``--overwrite``
    the folder it checked (moved aside, its inode verified, deleted once the new one is in place; put back
    if that last rename fails).  Anything else there is refused (:class:`OutputExistsError`)."""
    claim = _claim_for(out)
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    follow_umask(tmp)  # mkdtemp made it 0700: a server running as another user could not read it
    _check_unchanged(claim)
    if claim.state is None:
        try:
            rename_noreplace(tmp, claim.real)
        except FileExistsError:
            raise OutputExistsError(f"--out {claim.shown!r} appeared while the export was written (another "
                                    "program or run created it); nothing was replaced") from None
    elif claim.empty:
        try:
            os.rename(tmp, claim.real)  # rename(2) replaces a folder only while it is empty
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise OutputExistsError(f"--out {claim.shown!r} was empty when checked, but files were saved into it "
                                    "while the export was written: they were kept, nothing was replaced") from None
    else:
        _replace_checked(tmp, claim)
    claim.state, claim.empty = identity(claim.real), False
    if not _RUN_DEPTH[0]:
        _release(claim)


def _replace_checked(tmp: Path, claim: _Claim) -> None:
    trash = _owned_mkdtemp(OLD_PREFIX, claim.real)
    old = trash / "old"
    os.rename(claim.real, old)
    if identity(old) != claim.state:  # swapped since the check above: put it back untouched
        _put_back(old, trash, claim)
        raise OutputExistsError(f"--out {claim.shown!r} was replaced since it was checked; nothing was replaced")
    try:
        rename_noreplace(tmp, claim.real)
    except BaseException:
        _put_back(old, trash, claim)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _put_back(old: Path, trash: Path, claim: _Claim) -> None:
    try:
        rename_noreplace(old, claim.real)
    except OSError:
        log.warning("the previous content of --out %r is kept in %s: something else now occupies --out",
                    claim.shown, old)
        return
    shutil.rmtree(trash, ignore_errors=True)
