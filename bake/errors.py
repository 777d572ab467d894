"""Errors shared by every part of ``bake/``.

``FoldError`` is a ``ValueError`` so callers that already treat bad input as
``ValueError`` (exit code 2 in the CLI) keep doing so.
"""


class BakeError(Exception):
    """Base class for every error raised by the baker."""


class FoldError(BakeError, ValueError):
    """Maps cannot be folded as asked (unknown site, wrong dimension, non-finite values,
    or ``require_standard=True`` with sites that need an affine module)."""


class NonFiniteCastError(FoldError):
    """Casting weights to their stored or export dtype overflows (e.g. large maps in float16);
    ``tensors`` names them."""

    def __init__(self, dtype, counts: dict[str, int], note: str = ""):
        self.dtype = str(dtype).removeprefix("torch.")
        self.counts = dict(counts)
        self.tensors = tuple(counts)
        super().__init__(f"casting to {self.dtype} makes " + ", ".join(f"{k} ({n} value(s))" for k, n in counts.items())
                         + " non-finite" + note)


class ExportWriteError(BakeError, ValueError):
    """Writing the export failed (disk full, quota, read-only file system, permission) after the up-front
    checks passed; the temporary folder is already removed, so nothing is left behind."""


class VerificationError(BakeError):
    """The baked model does not reproduce the hooked model within tolerance.  ``report``: the failed check's
    report, a :class:`bake.verify.report.Report` (what the CLI prints), or None."""

    def __init__(self, msg: str, *, report=None):
        super().__init__(msg)
        self.report = report


class OutputExistsError(BakeError, ValueError):
    """``out_dir`` exists and is not empty, and overwriting was not asked for."""
