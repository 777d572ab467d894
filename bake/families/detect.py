"""Which family a ``--model`` is (:class:`bake.families.base.Family`)."""

from __future__ import annotations

import os

from bake.families.base import Family
from bake.families.causal_lm import CAUSAL_LM
from bake.families.diffusers.family import DIFFUSERS_PIPELINE

FAMILIES: tuple[Family, ...] = (DIFFUSERS_PIPELINE, CAUSAL_LM)  # the first that recognises a model; the last takes all


def detect(path: str | os.PathLike | None) -> Family:
    """The family of a ``--model`` argument: a local folder with ``model_index.json`` is a pipeline, anything
    else a causal LM."""
    return next(f for f in FAMILIES if f.recognises(path))


def other_options(family: Family) -> tuple[tuple[str, str], ...]:
    """The CLI options of every family but ``family`` (refused for it, not silently ignored)."""
    return tuple(o for f in FAMILIES if f is not family for o in f.options)
