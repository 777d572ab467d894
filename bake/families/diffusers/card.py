"""Model card and provenance of a baked diffusers pipeline (the pipeline family's card fields)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bake.core.plan_types import FoldPlan
from bake.families.diffusers.family import DIFFUSERS_PIPELINE
from bake.publish.card import (
    CARD_FILE,
    CARD_TAGS,
    PROVENANCE_FILE,
    VERIFICATION_FILE,
    base_link,
    package_versions,
    seal,
    write_json,
)
from lineas.io import atomic_write_text


@dataclass
class PipelineExportInfo:
    base_model: str                 # as given on the command line
    base_path: str                  # resolved folder
    pipeline_class: str
    maps: list[dict]                # MapsSource.describe() per maps input
    plan: FoldPlan
    report: object                  # bake.families.diffusers.verify.PipelineReport
    components_baked: list[str]     # component folders rewritten by the bake
    components_copied: list[str]    # copied byte for byte from the base pipeline
    command: str
    bakes: list[dict] = field(default_factory=list)   # every bake in this pipeline, this one last
    removed_files: list[str] = field(default_factory=list)  # stale weight files of rewritten components
    onnx: object | None = None      # bake.families.diffusers.onnx.OnnxPipelineReport with --format hf,onnx
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def provenance(info: PipelineExportInfo) -> dict:
    versions = package_versions()
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:  # a card can be rebuilt without diffusers
        pass
    return {"tool": "lineas-bake", "family": DIFFUSERS_PIPELINE.kind.value, "versions": versions,
            "created": info.created, "command": info.command,
            "base_model": {"name": info.base_model, "path": info.base_path, "pipeline_class": info.pipeline_class},
            "maps": info.maps, "strengths": [m["strength"] for m in info.maps],
            "export": {"components_baked": info.components_baked, "components_copied": info.components_copied,
                       "removed_files": info.removed_files,
                       "trust_remote_code_needed": False,
                       "onnx": None if info.onnx is None else {"folder": Path(info.onnx.folder).name,
                                                               "ort_class": info.onnx.ort_class,
                                                               "passed": info.onnx.passed}},
            "verification": {"skipped": info.report.skipped, "passed": info.report.passed and not info.report.skipped,
                             "file": VERIFICATION_FILE},
            "bakes": info.bakes, "plan_summary": info.plan.summary(), "plan": info.plan.to_dict()}


def render(info: PipelineExportInfo, repo: str = "path/to/this/folder") -> str:
    fam = DIFFUSERS_PIPELINE
    front = ["---", f"base_model: {json.dumps(info.base_model)}", f"library_name: {fam.library_name}",
             f"pipeline_tag: {fam.pipeline_tag}", "tags:", *[f"- {t}" for t in CARD_TAGS], "---"]
    maps = "\n".join(f"| {i + 1} | `{m['origin']}` | `{m['sha256'][:12]}` | {m['method']} | {len(m['sites'])} | "
                     f"{m['strength']:g} |" for i, m in enumerate(info.maps))
    report = info.report
    verdict = ("**Verification was skipped (`--no-verify`)**: treat this pipeline as unverified." if report.skipped
               else "The written pipeline, reloaded with plain diffusers, was compared in float32 with the original "
                    "pipeline plus steering hooks: the denoiser on random latents, timesteps and conditioning, and "
                    f"the full pipeline ({report.steps} steps, seed {report.seed}, guidance on)."
               if report.passed else "**Verification failed**; see the table.")
    onnx_folder = "" if info.onnx is None else Path(info.onnx.folder).name
    onnx = "" if info.onnx is None else f"""
## ONNX

The `{onnx_folder}/` folder holds the same pipeline exported with optimum-onnx and checked in ONNX Runtime
({info.onnx.provider}) against the hooked original:

```
{info.onnx.to_table()}
```

```python
from huggingface_hub import snapshot_download
from optimum.onnxruntime import {info.onnx.ort_class}

# optimum-onnx loads a pipeline from a folder (no subfolder= for pipelines): fetch the ONNX files first
path = snapshot_download("{repo}", allow_patterns=["{Path(info.onnx.folder).name}/*"])  # or a local copy
pipe = {info.onnx.ort_class}.from_pretrained(f"{{path}}/{Path(info.onnx.folder).name}")
```
"""
    return f"""{chr(10).join(front)}

# {info.base_model} — steered with lineas-bake

This is the {info.pipeline_class} {base_link(info.base_model)} with per-neuron affine activation-steering maps
(LinEAS / Linear-AcT) **baked into its weights**: it generates what the base pipeline generates with the steering
hooks attached (at every denoising step, on both halves of classifier-free guidance), without hooks and without
extra code.

## What was steered

| # | maps file | sha256 | method | sites | strength λ |
|---|---|---|---|---|---|
{maps}

## How it was folded

Rewritten components: {', '.join(info.components_baked) or 'none'}; copied byte for byte:
{', '.join(info.components_copied) or 'none'}. Adaptive LayerNorms (SD3/FLUX) fold into the rows of their
modulation Linear (scale rows `W <- diag(a) W, c <- a c + (a - 1)`, shift rows `W <- diag(a) W, c <- a c + b`).

```
{info.plan.to_table()}
```

## Verification

{verdict}

```
{report.to_table()}
```

Row definitions and limits are in `{VERIFICATION_FILE}`; inputs and the fold plan in `{PROVENANCE_FILE}`.

## How to load

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo}")
image = pipe("a photo of a cat").images[0]
```
{onnx}
## Reproduce

```
{info.command}
```
"""


def write_files(folder: Path, info: PipelineExportInfo, repo: str = "path/to/this/folder") -> None:
    """The verification report, the card, then the provenance file, sealed last with the sha256 of every
    other file in the folder (:func:`bake.publish.card.seal`; ``lineas-bake push`` checks them)."""
    write_json(folder / VERIFICATION_FILE, info.report.to_dict())
    atomic_write_text(folder / CARD_FILE, render(info, repo))
    seal(folder, provenance(info))
