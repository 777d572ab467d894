"""The integrity record of an export folder: what the bake wrote, and whether the folder still holds exactly that.

The bake's provenance file is written last (:func:`bake.publish.card.seal`) with :func:`integrity_record`:
the size and sha256 of every regular file in the folder, subfolders included, but the provenance file
itself (it cannot hold its own hash) and the temp folder's owner marker (removed when the folder is put
in place).  ``lineas-bake push`` lists the folder without following symlinks (:func:`scan_folder`),
hashes what it finds and compares (:func:`recorded_files`, :func:`compare`).  This catches a folder
changed after the bake (weights swapped, files added or removed); it is not a signature: whoever can
write the folder can also rewrite the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from bake.plan.history import PROVENANCE_FILE
from bake.publish.outdir import OWNER_FILE

INTEGRITY_KEY = "integrity"  # provenance key: {"algorithm": "sha256", "covers": ..., "files": {path: {size, sha256}}}
CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a regular file, opened without following a symlink."""
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as fh:
        digest = hashlib.sha256()
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
        return os.fstat(fh.fileno()).st_size, digest.hexdigest()


def file_manifest(folder: Path) -> dict[str, dict]:
    """``{relative posix path: {"size", "sha256"}}`` of every regular file under ``folder`` (symlinks not
    followed), but the provenance file and the owner marker at its top."""
    folder, out = Path(folder), {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel in (PROVENANCE_FILE, OWNER_FILE) or not stat.S_ISREG(path.lstat().st_mode):
                continue
            size, sha256 = sha256_file(path)
            out[rel] = {"size": size, "sha256": sha256}
    return out


def integrity_record(folder: Path) -> dict:
    """The provenance's ``integrity`` value for ``folder`` as it is now (call it once every other file is written)."""
    return {"algorithm": "sha256", "covers": f"every file in this folder but {PROVENANCE_FILE}",
            "files": file_manifest(folder)}


def scan_folder(folder: Path) -> tuple[list[str], list[str]]:
    """(regular files, ``"path: why"`` for everything else) under ``folder``, symlinks never followed:
    symlinks (to files or folders, inside or outside it), dotfiles and dot-folders, FIFOs, sockets, devices."""
    regular, odd, stack = [], [], [""]
    while stack:
        rel = stack.pop()
        with os.scandir(folder / rel) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            path = rel + e.name
            if e.is_symlink():
                inside = Path(os.path.realpath(e.path)).is_relative_to(folder)
                odd.append(f"{path}: symlink to {os.readlink(e.path)} ({'inside' if inside else 'outside'} the folder)")
            elif e.name.startswith("."):
                odd.append(f"{path}{'/' if e.is_dir(follow_symlinks=False) else ''}: dotfile")
            elif e.is_dir(follow_symlinks=False):
                stack.append(path + "/")
            elif e.is_file(follow_symlinks=False):
                regular.append(path)
            else:
                odd.append(f"{path}: not a regular file")
    return sorted(regular), sorted(odd)


def _plain(rel) -> bool:
    """A relative posix path without ``..``, empty or ``.`` parts."""
    return isinstance(rel, str) and bool(rel) and not rel.startswith("/") and PurePosixPath(rel).as_posix() == rel \
        and ".." not in PurePosixPath(rel).parts


def recorded_files(folder: Path) -> dict[str, tuple[int, str]]:
    """``{path: (size, sha256)}`` from the integrity record of ``folder``'s provenance file.  Raises
    ValueError saying what is wrong with that file (missing, not JSON, no record or a malformed one)."""
    path = folder / PROVENANCE_FILE
    if path.is_symlink() or not path.is_file():
        raise ValueError("missing: this folder was not written by lineas-bake, or the file was removed")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"not readable as JSON ({e})") from None
    record = data.get(INTEGRITY_KEY) if isinstance(data, dict) else None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError(f"records no file hashes (no {INTEGRITY_KEY!r} record: written by a lineas-bake older "
                         "than this one, or edited); bake the model again")
    out = {}
    for rel, entry in files.items():
        size, sha = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if not (_plain(rel) and type(size) is int and isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise ValueError(f"malformed {INTEGRITY_KEY!r} entry {str(rel)[:200]!r}: {str(entry)[:200]}")
        out[rel] = (size, sha)
    return out


def compare(recorded: dict[str, tuple[int, str]], local: dict[str, tuple[int, str]]) -> list[str]:
    """``"path: why"`` for each file changed, missing or not written by the bake (``local``: path -> (size,
    sha256) of the regular files found, the provenance file left out)."""
    problems = []
    for rel in sorted(set(recorded) | set(local)):
        have, want = local.get(rel), recorded.get(rel)
        if want is None:
            problems.append(f"{rel}: not written by the bake (extra file)")
        elif have is None:
            problems.append(f"{rel}: missing (the bake wrote it)")
        elif have != want:
            problems.append(f"{rel}: changed after the bake (now {have[0]} bytes, sha256 {have[1][:12]}; the bake "
                            f"wrote {want[0]} bytes, sha256 {want[1][:12]})")
    return problems
