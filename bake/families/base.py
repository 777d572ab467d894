"""Model families: what differs between baking a causal LM and a diffusers pipeline.

The planner (:func:`bake.plan.planner.plan`), the executor (:func:`bake.fold.execute.apply_plan`), the fold math
(:mod:`bake.core.fold_math`), the output-folder machinery (:mod:`bake.publish.outdir`), the re-bake rule
(:func:`bake.plan.history.check_rebake`), the reference guard (:mod:`bake.verify.guard`), the verification
error and its report (:class:`bake.verify.report.Report`) and publishing (:mod:`bake.publish.hub`) are shared.
A family contributes only what :class:`Family` lists; :func:`bake.families.detect.detect` picks the family of
a ``--model`` path, and the CLI dispatches on it.  The two families: :data:`bake.families.causal_lm.CAUSAL_LM`
and :data:`bake.families.diffusers.family.DIFFUSERS_PIPELINE`.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Protocol


class FamilyKind(str, Enum):
    CAUSAL_LM = "causal-lm"
    DIFFUSERS_PIPELINE = "diffusers-pipeline"


class Family(Protocol):
    """What a model family contributes to a bake."""

    kind: FamilyKind                              # the CLI's dispatch key; recorded in provenance
    library_name: str                             # model card front matter
    pipeline_tag: str
    options: tuple[tuple[str, str], ...]          # CLI options of this family only: (flag, argparse dest)

    def recognises(self, path: str | os.PathLike | None) -> bool:
        """Whether a local ``--model`` folder (None: not local) is a model of this family."""
        ...

    def reference(self, model, affines, **options):
        """The hooked reference a check compares the bake with, recorded with ``affines`` (site -> (scale,
        shift)) hooked and refused by the shared guard (:mod:`bake.verify.guard`) when it is broken or
        the maps change nothing the check can see."""
        ...
