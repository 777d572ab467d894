"""``lineas-train``'s output files (``--out``, ``--report-json``): checked before any work, written without
clobbering, never onto an input.

The rules are those of ``lineas-bake --out``:

* an existing file is replaced only with ``--overwrite`` (and the final rename refuses a file that appeared
  while training ran, unless ``--overwrite``);
* an output is never an input: not a file of the model (its folder's files, each symlink resolved, so a
  Hugging Face cache blob is one), not a ``--source``/``--target`` prompt file (built-in sets included);
* ``--report-json`` and ``--out`` are two different files;
* the write is atomic: a temporary file next to the destination, renamed into place.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from lineas.io import TMP_MARK, rename_noreplace, resolved_entries, writable_anchor


def model_files(model: str) -> set[Path]:
    """Every path the model ``model`` (a folder, or a Hub id already in the local cache) is read from:
    the folder, its entries and the targets of its symlinks; for a cached Hub id its whole cache folder
    (``blobs/`` included).  Empty when nothing local is known."""
    local = Path(str(model)).expanduser()
    if local.is_dir():
        return resolved_entries(local)
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(model), "config.json")
    except Exception:  # not a valid repo id, no cache: nothing local to protect
        return set()
    if isinstance(hit, str) and Path(hit).is_file():
        repo = Path(hit).parent.parent.parent  # <cache>/models--o--n/snapshots/<rev>/config.json
        return resolved_entries(repo) if repo.name.startswith("models--") else resolved_entries(Path(hit).parent)
    return set()


def _same(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: dict[str, str | None], *, overwrite: bool, inputs: Iterable[Path]) -> None:
    """Refuse (``ValueError`` naming the flag and the path) outputs ``{flag: path}`` that exist without
    ``overwrite``, that are one of ``inputs`` (resolved), or that name the same file as each other."""
    given = {flag: Path(p).expanduser() for flag, p in outputs.items() if p}
    real_inputs = {Path(os.path.realpath(p)) for p in inputs}
    for flag, path in given.items():
        real = Path(os.path.realpath(path))
        if real in real_inputs or path.absolute() in real_inputs:
            raise ValueError(f"{flag} {str(path)!r} is an input of this run (a file of the model or a prompt file"
                             f"{', through a symlink' if real != path.absolute() else ''}); writing it would destroy "
                             "it. Give another path")
        if os.path.lexists(path) and not overwrite:
            raise ValueError(f"{flag} {str(path)!r} already exists; pass --overwrite to replace it")
    flags = list(given)
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            if given[a] == given[b] or _same(given[a], given[b]):
                raise ValueError(f"{a} and {b} are the same file {str(given[a])!r}; give two different paths")


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output file that cannot be written: a directory, a path under a
    file, or a folder where a probe file cannot be created (read-only).  Missing folders are made at
    write time, so the probe goes to the nearest existing one; it is removed at once, so nothing is
    left on disk."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; give a file name such as "
                         f"{str(out / 'maps.safetensors')!r}")
    try:
        writable_anchor(out)
    except ValueError as e:
        raise ValueError(f"{flag} {str(path)!r}: {e}") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r} exists and is read-only")


def check_train_outputs(out: str, report_json: str | None, *, overwrite: bool, model: str,
                        prompts: Iterable[str]) -> None:
    """``lineas-train``'s outputs against its inputs: the files of ``model`` and of the prompt specs."""
    from lineas.prompts import prompt_file

    check_output_file(out)
    if report_json:
        check_output_file(report_json, "--report-json")
    inputs = model_files(model) | {p for p in map(prompt_file, prompts) if p is not None}
    check_outputs({"--out": out, "--report-json": report_json}, overwrite=overwrite, inputs=inputs)


def write_new(path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``: replacing what is
    there only with ``overwrite`` (else ``FileExistsError``, e.g. a file created while training ran).  The
    temporary file is removed on any failure.  A symlink at ``path`` is replaced, never written through."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{secrets.token_hex(4)}"
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            rename_noreplace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
