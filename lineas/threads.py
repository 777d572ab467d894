"""How many CPU threads a run should use: shared by the demo and the llama.cpp check."""

from __future__ import annotations

import math
import os


def pick_threads(requested: int) -> int:
    """``requested`` if > 0; else all cores when the machine is idle, fewer when it is busy.

    PyTorch's OpenMP threads spin-wait for each other: with two threads on two
    cores that other processes also use, a SmolLM2 forward pass was measured
    20x slower than with one thread.  So the automatic choice leaves out the
    cores that the 1-minute load average says are taken.
    """
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - math.ceil(busy - 0.5)))
