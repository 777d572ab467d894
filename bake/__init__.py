"""bake: fold steering maps into model weights, verify, export and publish.

The public API mirrors the ``lineas-bake`` CLI::

    from bake import bake
    baked = bake("smollm2-135m", "maps.safetensors", strength=1.0)
    baked.save_pretrained("out-dir", dtype="bfloat16")

    from bake import bake_pipeline          # a diffusers pipeline folder (model_index.json)
    bake_pipeline("./sdxl", "maps.safetensors", strength=0.8, out="sdxl-steered")

``bake.load_onnx(out_dir)`` loads an ONNX export in ONNX Runtime, ready to generate (needs the onnx
extra, so it is imported on first use and left out of ``__all__``).
"""

from bake.api import bake, bake_folder, plan_bake
from bake.errors import BakeError, FoldError, OutputExistsError, VerificationError
from bake.families.diffusers.bake import PipelineBake, bake_pipeline, plan_pipeline_bake
from bake.formats.export import (
    EXPORTERS,
    ExportOptions,
    ExportResult,
    export,
    register_exporter,
)
from bake.plan.history import ModelMismatchError, RebakeError
from bake.results import BakedModel, BaseModel, default_out_dir
from bake.verify.check import VerificationReport
from bake.verify.tolerances import TOLERANCES, Tolerance, register_tolerance

__all__ = [
    "EXPORTERS",
    "TOLERANCES",
    "BakeError",
    "BakedModel",
    "BaseModel",
    "ExportOptions",
    "ExportResult",
    "FoldError",
    "ModelMismatchError",
    "OutputExistsError",
    "RebakeError",
    "Tolerance",
    "VerificationError",
    "VerificationReport",
    "PipelineBake",
    "bake_pipeline",
    "plan_pipeline_bake",
    "bake",
    "bake_folder",
    "default_out_dir",
    "export",
    "plan_bake",
    "register_exporter",
    "register_tolerance",
]


def __getattr__(name: str):
    # load_onnx needs the onnx extra, so bake.formats.onnx is imported on first use, not with the package.
    if name == "load_onnx":
        from bake.formats.onnx import load_onnx

        return load_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
