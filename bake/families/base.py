"""Model families: what differs between baking a causal LM and a diffusers pipeline.

The planner (:func:`bake.plan.planner.plan`), the executor (:func:`bake.fold.execute.apply_plan`), the fold math
(:mod:`bake.core.fold_math`), the output-folder machinery (:mod:`bake.publish.outdir`) and publishing
(:mod:`bake.publish.hub`) are shared.  A family contributes only: how a model is recognised, its module
tree, its probes and metrics (logits/KL/greedy tokens vs noise prediction/image), its card fields
and its fallback story for sites that do not fold.  :func:`detect` picks the family of a
``--model`` path; the CLI hands a pipeline to :mod:`bake.families.diffusers.bake` and everything else to the
causal-LM path (:mod:`bake.api`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum


class FamilyKind(str, Enum):
    CAUSAL_LM = "causal-lm"
    DIFFUSERS_PIPELINE = "diffusers-pipeline"


@dataclass(frozen=True)
class Family:
    kind: FamilyKind
    library_name: str            # model card front matter
    pipeline_tag: str
    probes: str                  # what verification runs (for the plan and card)
    fallback: str                # what happens to a site with no exact fold


CAUSAL_LM = Family(
    kind=FamilyKind.CAUSAL_LM, library_name="transformers", pipeline_tag="text-generation",
    probes="logits on prompts and random tokens (max rel, KL, top-1), greedy tokens",
    fallback="an affine module after the site, shipped as remote code (refused with --require-standard)")

DIFFUSERS_PIPELINE = Family(
    kind=FamilyKind.DIFFUSERS_PIPELINE, library_name="diffusers", pipeline_tag="text-to-image",
    probes="denoiser noise prediction on random latents/timesteps/conditioning (max rel), full pipeline image "
           "with a fixed seed (max abs pixel difference)",
    fallback="none: diffusers has no standard loading path for extra modules, so a site that does not fold is "
             "refused and nothing is written (--require-standard is implied)")


def detect(path: str | os.PathLike | None) -> Family:
    """The family of a ``--model`` argument: a local folder with ``model_index.json`` is a pipeline."""
    from lineas.pipelines import is_pipeline_folder

    if path is not None and os.path.isdir(path) and is_pipeline_folder(path):
        return DIFFUSERS_PIPELINE
    return CAUSAL_LM
