"""What the CLI's commands share: exit codes, defaults, the options of one family only, and how a
failure is printed."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

from lineas.io import ExitCode, fail

EXIT_OK, EXIT_BAD_INPUT, EXIT_VERIFY = ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.VERIFY
EXIT_TERMINATED = 128 + signal.SIGTERM  # the shell's code for a process ended by SIGTERM
PROG = "lineas-bake"
DEFAULT_VERIFY_TOKENS, DEFAULT_VERIFY_STEPS = 8, 2
# Options of one model family only are its Family.options (bake.families), as (flag, argparse dest).  Their
# parser defaults are None (or False), so that an option the command line sets is refused for the other family
# even at its default value; the defaults are applied where the family's path reads them.


def fail_cli(msg: str, code: int) -> int:
    """Print ``lineas-bake: msg`` to stderr and return ``code`` (the one way the CLI reports a failure)."""
    return fail(PROG, msg, code)


def given_options(args, options: Sequence[tuple[str, str]]) -> list[str]:
    """The flags of ``options`` (``(flag, dest)`` pairs) that the command line set."""
    return [flag for flag, dest in options if getattr(args, dest) not in (None, False)]


def check_out_name(out: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output path the file system cannot hold or that leads nowhere: a name
    longer than the file system allows (NAME_MAX, usually 255 bytes), a path longer than PATH_MAX, or a
    symlink whose target does not exist (the final rename would fail on it after all the work)."""
    from bake.publish.outdir import OutputPathError

    path = Path(out).expanduser()
    full = os.fsencode(os.path.abspath(path))
    path_max = _limit("PC_PATH_MAX", 4096)
    if len(full) >= path_max:
        raise OutputPathError(f"{flag} {_short(out)}: the path is {len(full)} bytes long, over this system's "
                              f"limit of {path_max - 1} (PATH_MAX); give a shorter one")
    name_max = _limit("PC_NAME_MAX", 255)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputPathError(f"{flag} {_short(out)}: the name {_short(part)} is {len(os.fsencode(part))} "
                                  f"bytes long, over the file system's limit of {name_max} (NAME_MAX)")
    if path.is_symlink() and not path.exists():
        raise OutputPathError(f"{flag} {str(out)!r} is a symlink to {os.readlink(path)!r}, which does not exist; "
                              "give the folder itself (or remove the dangling link)")


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name)) or default
    except (OSError, ValueError):
        return default


def _short(text, keep: int = 40) -> str:
    text = str(text)
    return repr(text) if len(text) <= 2 * keep else repr(f"{text[:keep]}...{text[-keep:]}")
