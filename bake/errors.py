"""Errors shared by every part of ``bake/``.

``FoldError`` is a ``ValueError`` so callers that already treat bad input as
``ValueError`` (exit code 2 in the CLI) keep doing so.
"""


class BakeError(Exception):
    """Base class for every error raised by the baker."""


class FoldError(BakeError, ValueError):
    """Maps cannot be folded as asked (unknown site, wrong dimension, non-finite values,
    or ``require_standard=True`` with sites that need an affine module)."""


class VerificationError(BakeError):
    """The baked model does not reproduce the hooked model within tolerance."""
