"""The one top-level handler of each command (``lineas-bake``, ``lineas-bake push``, ``lineas-train``).

No traceback ever reaches the user:

* a known error (bad input, a failed verification, the Hub) is one line ``prog: error: message`` and its
  exit code (:func:`exit_code_of`): 2 bad input, 3 verification failed, the Hub's own code;
* an unknown one is one line ending in "please report this", exit 1; ``-v``/``--verbose`` prints its
  traceback first;
* Ctrl-C exits 130 and SIGTERM 143 (the shell's codes) after the ``finally`` blocks below have cleaned
  up (the export's temporary folder, llama.cpp's processes): one line saying what was left.  An
  interrupt that comes once the output is in place (the final rename done) exits 0 with a note saying so,
  since the work is complete; if an upload was still to come, it exits 1 as a failed upload does, saying
  how to push the export (:class:`Output`).

SIGTERM raises :class:`lineas.io.Terminated` for the whole run (:func:`lineas.io.sigterm_raises_once`), not
only while an export is written, so every ``finally`` runs whatever the run was doing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bake.errors import BakeError, VerificationError
from bake.publish.hub_errors import HubError
from bake.publish.outdir import OWNER_FILE, TMP_PREFIX
from bake.store.shards import ShardFormatError
from lineas.errors import ModelLoadError
from lineas.hooks import SteeringError
from lineas.io import ExitCode, Terminated, fail, sigterm_raises_once
from lineas.maps import MapsFormatError
from lineas.prompts import PromptError

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
REPORT_URL = "https://github.com/lineas-bake/lineas-bake/issues"
# Errors that mean "the input is bad" wherever they come from (the message names the value).
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (MapsFormatError, SteeringError, ModelLoadError,
                                                     ShardFormatError, PromptError)
# An OSError with one of these is the environment refusing a path the user gave (disk full, permissions,
# a name too long, a symlink to nowhere): bad input, with the path named.
_PATH_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY,
                errno.EXDEV, errno.EMLINK}


def train_bad_input() -> tuple[type[BaseException], ...]:
    """``lineas-train``'s own bad-input errors, besides :data:`BAD_INPUT_ERRORS` (imported when it runs)."""
    from lineas.evaluate import EvaluationError
    from lineas.learn.config import ConfigError
    from lineas.learn.mlact import MlActImportError

    return ConfigError, MlActImportError, EvaluationError


def wants_traceback(argv: list[str]) -> bool:
    """``-v``/``--verbose`` anywhere before ``--`` (read before parsing: a parse may not happen)."""
    head = argv[:argv.index("--")] if "--" in argv else argv
    return any(a in ("-v", "--verbose") for a in head)


def exit_code_of(e: BaseException, extra: tuple[type[BaseException], ...] = ()) -> int | None:
    """The exit code of a known error; None for an unknown one."""
    if isinstance(e, VerificationError):
        return ExitCode.VERIFY
    if isinstance(e, HubError):
        return int(e.exit_code)
    if isinstance(e, BAD_INPUT_ERRORS + extra) or (isinstance(e, BakeError) and isinstance(e, ValueError)):
        return ExitCode.BAD_INPUT
    if isinstance(e, OSError) and e.errno in _PATH_ERRNOS:
        return ExitCode.BAD_INPUT
    if isinstance(e, BakeError):
        return ExitCode.FAIL
    return None


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), cut to ``limit``."""
    flat = " ".join(str(text).split())
    return flat if limit is None or len(flat) <= limit else flat[:limit - 3] + "..."


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in _PATH_ERRNOS:
        where = f"{e.filename!r}" + (f" -> {e.filename2!r}" if e.filename2 else "")
        return f"{e.strerror or e}: {where}" if e.filename else str(e)
    return str(e)


@dataclass
class Output:
    """What a run writes, so that an interrupt can say whether it is in place: ``path`` (``--out``) and what
    was there when it was claimed (device and inode, or None).  Placed: ``path`` is there now and is not
    what was there before (the final rename makes the finished temporary folder, a new inode, the
    output).  ``pending``: what still had to happen once it was placed (an upload), and how to do it."""

    kind: str = "export"
    path: Path | None = None
    before: tuple[int, int] | None = None
    pending: str = ""
    resume: str = ""
    unfinished: str = ""  # what an interrupt before placement says instead of "the <kind> was not written"

    def claim(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.before = _identity(self.path)

    def placed(self) -> bool:
        if self.path is None:
            return False
        now = _identity(self.path)
        return now is not None and now != self.before


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _quiet_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored while an interrupt is reported and cleaned up (no second traceback)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def guarded(prog: str, run: Callable[[], int], *, verbose: bool = False, output: Output | None = None,
            extra_bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """``run()`` under the one handler (see the module docstring); returns the exit code."""
    output = output or Output()
    try:
        with sigterm_raises_once():
            return run()
    except (KeyboardInterrupt, Terminated) as e:
        with _quiet_signals():
            return _interrupted(prog, e, output)
    except Exception as e:
        with _quiet_signals():
            _remove_own_temp(output)
            if isinstance(e, VerificationError) and getattr(e, "report", None) is not None:
                print(e.report.failure_details(), file=sys.stderr)
            code = exit_code_of(e, extra_bad_input)
            if code is None:
                if verbose:
                    traceback.print_exception(e)
                return fail(prog, one_line(f"internal error: {type(e).__name__}: {e}", 600) + f" -- please report this "
                            f"at {REPORT_URL}" + ("" if verbose else f" (run {prog} -v ... for the traceback)"),
                            ExitCode.FAIL)
            if verbose:
                traceback.print_exception(e)
            text = one_line(_message(e))
            if isinstance(e, VerificationError):
                text = f"verification failed, nothing written: {text}"
            return fail(prog, text, code)


def _interrupted(prog: str, e: BaseException, output: Output) -> int:
    how = "terminated by SIGTERM" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
    if output.placed():
        if output.pending:
            return fail(prog, f"{how} during {output.pending}; the {output.kind} itself is complete at "
                              f"{output.path}" + (f": {output.resume}" if output.resume else ""), ExitCode.FAIL)
        print(f"{prog}: note: {how} after the {output.kind} was complete: it is in place at {output.path}",
              file=sys.stderr)
        return ExitCode.OK
    _remove_own_temp(output)
    where = f" to {output.path}" if output.path is not None else ""
    return fail(prog, f"{how}: " + (output.unfinished or f"the {output.kind} was not written{where}; nothing was "
                                    "left behind"),
                EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED)


def _remove_own_temp(output: Output) -> None:
    """The last line of "nothing left behind": a ``lineas_tmp_<this pid>_*`` folder next to the output that
    an earlier step could not remove (or never owned: created, then the disk filled before its owner marker
    was written).  Another host's folder (by its marker) is never touched."""
    if output.path is None:
        return
    try:
        leftovers = list(output.path.parent.glob(f"{TMP_PREFIX}{os.getpid()}_*"))
    except OSError:
        return
    for folder in leftovers:
        try:
            owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and owner.get("host") not in (None, socket.gethostname()):
            continue
        shutil.rmtree(folder, ignore_errors=True)
