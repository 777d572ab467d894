"""What the CLI's commands share: exit codes, defaults, the options of one family only, and how a
failure is printed."""

from __future__ import annotations

import signal
from collections.abc import Sequence

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
