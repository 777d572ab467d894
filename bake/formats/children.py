"""Child processes that end with their parent, whatever ends it.

The GGUF export runs two programs of llama.cpp's in processes of their own: the converter
(:mod:`bake.formats.gguf`) and the worker that loads the file (:mod:`bake.formats.llamacpp`).  Neither may
outlive lineas-bake:

* an exception in the parent (Ctrl-C, SIGTERM as :class:`lineas.io.Terminated`, any error) ends the
  child in the ``except``/``finally`` that started it (:func:`end_child`);
* a parent killed outright (SIGKILL, the OOM killer), which runs no ``finally``, takes the child with it:
  on Linux the child asks the kernel for ``PR_SET_PDEATHSIG`` (SIGKILL) before it runs anything
  (:func:`start_child`).  The kernel sends that signal when the *thread* that forked the child ends, so it
  is asked for only from the main thread, whose end is the process's end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's ``prctl``, looked up in the parent: a child between fork and exec must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None


_PRCTL = _prctl()


def _death_signal(parent: int):
    """The ``preexec_fn`` of a child: SIGKILL when the parent ends; and if the parent is gone already (it
    died between the fork and here), end now."""
    prctl = _PRCTL

    def set_it() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_it


def start_child(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)``, the child bound to end with this process (see the module
    docstring); it stays in this process group, so a Ctrl-C at the terminal reaches it too."""
    if _PRCTL is not None and threading.current_thread() is threading.main_thread():
        kwargs["preexec_fn"] = _death_signal(os.getpid())
    return subprocess.Popen(cmd, **kwargs)


def end_child(proc: subprocess.Popen, *, grace: float = 2.0) -> None:
    """Stop ``proc`` now (SIGTERM, then SIGKILL after ``grace`` seconds) and reap it."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:  # pragma: no cover - ended in between
        pass
