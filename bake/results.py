"""The result types of a bake: :class:`BaseModel` (where the model came from) and
:class:`BakedModel` (the folded model plus how it got there).

They live apart from :mod:`bake.api` so that the exporters (:mod:`bake.formats.export`,
:mod:`bake.formats.onnx`) can name them without importing the API that calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bake.plan.inputs import MapsSource
from bake.plan.planner import FoldPlan
from bake.store.stores import FolderStore
from bake.verify.check import Reference, VerificationReport
from lineas.maps import SiteMap
from lineas.models import display_name


@dataclass(frozen=True)
class BaseModel:
    """Where the original model came from (for provenance and copying its tokenizer)."""

    name: str  # what the user gave
    path: str  # resolved directory or Hub id ("" for an in-memory module without one)
    display: str  # Hub-style name for the model card
    config_sha256: str  # of the original config, before any fold changed a flag


@dataclass(frozen=True)
class StreamSource:
    """What the streaming exporter needs to write a baked folder from its source checkpoint."""

    store: FolderStore  # the source shards, addressed by parameter name
    device: str
    max_memory: int | None  # bytes of weights in memory while verifying (None: bake.store.checkpoint's default)
    trust_remote_code: bool
    verify: bool = True  # record the hooked reference and verify the written export
    verify_tokens: int = 8
    progress: bool | None = False


@dataclass
class BakedModel:
    """A model with the steering folded into its weights, plus how it got there."""

    model: nn.Module
    tokenizer: object | None
    plan: FoldPlan
    report: VerificationReport
    maps: list[MapsSource]
    base: BaseModel
    effective: dict[str, SiteMap]
    reference: Reference | None  # hooked outputs on the probes; None with verify=False
    export_report: VerificationReport | None = None  # the report of the last save_pretrained (with reload checks)
    source: StreamSource | None = None  # set by bake_folder: ``model`` is a meta skeleton, weights stay on disk

    @property
    def verified(self) -> bool:
        """True once the baked model was compared with the hooked one and passed (for
        :func:`bake.api.bake_folder`, that happens in ``save_pretrained``)."""
        return not self.report.skipped and self.report.passed and self.reference is not None

    @property
    def bakes(self) -> list[dict]:
        """Every bake recorded in the model's config (earlier ones first, this one last)."""
        from bake.plan.history import recorded_bakes

        return recorded_bakes(getattr(self.model, "config", None))

    def save_pretrained(self, out_dir: str | Path | None = None, *, dtype: str = "float32",
                        formats: str | Sequence[str] = "hf", overwrite: bool = False, command: str = "",
                        publish=None, progress: bool = False) -> Path:
        """Write the export folder (atomically) and return its path; see :func:`bake.formats.export.export`."""
        from bake.formats.export import (
            export,  # the exporter imports this module, not the other way round
        )

        out = Path(out_dir) if out_dir is not None else Path(default_out_dir(self.base.display))
        return export(self, out, formats=formats, dtype=dtype, overwrite=overwrite, command=command,
                      publish=publish, progress=progress)


def default_out_dir(model_name: str) -> str:
    """``<model-name>-steered`` in the current directory (last path / Hub-id component)."""
    return display_name(model_name).rstrip("/").split("/")[-1] + "-steered"
