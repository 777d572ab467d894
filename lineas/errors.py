"""Errors shared by the loading modules (:mod:`lineas.models`, :mod:`lineas.hub_checkpoint`,
:mod:`lineas.pipelines`), kept below all three so that none of them imports another for its error type."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model could not be resolved or loaded; the message says what to do."""
