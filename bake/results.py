"""The result types of a bake: :class:`BaseModel` (where the model came from) and
:class:`BakedModel` (the folded model plus how it got there).

:class:`BakedModel` is what :func:`bake.api.bake` returns; the exporters read it through the
:class:`bake.formats.baked.Baked` protocol, so they do not import this module (it imports them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from bake.formats.baked import BaseModel, StreamSource
from bake.formats.export import export
from bake.plan.inputs import MapsSource
from bake.plan.planner import FoldPlan
from bake.verify.check import Reference, VerificationReport
from lineas.maps import SiteMap
from lineas.models import display_name


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
    # max |value| before the fold of each tensor the plan writes (in-memory bakes): an export dtype that the
    # base value already overflows is the base model's fault, not the maps' (bake.formats.hf)
    base_absmax: dict[str, float] = field(default_factory=dict)

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
                        publish=None, progress: bool = False, check_runtimes: str | Sequence[str] = ()) -> Path:
        """Write the export folder (atomically) and return its path; see :func:`bake.formats.export.export`
        (``check_runtimes``: ``"vllm"``, ``"mlx"``: serve the written folder there and compare, before it is placed)."""
        out = Path(out_dir) if out_dir is not None else Path(default_out_dir(self.base.display))
        return export(self, out, formats=formats, dtype=dtype, overwrite=overwrite, command=command,
                      publish=publish, progress=progress, check_runtimes=check_runtimes)


def default_out_dir(model_name: str) -> str:
    """``<model-name>-steered`` in the current directory: the last component of a Hub id, or the name of
    a local folder resolved first (``--model .`` is named after the folder it means, not ``-steered``)."""
    local = Path(model_name).expanduser()
    if local.is_dir():
        return local.resolve().name + "-steered"
    return display_name(model_name).rstrip("/").split("/")[-1] + "-steered"
