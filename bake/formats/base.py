"""The exporter interface: options, results, and the registry of exporters by format name.

An exporter is ``fn(baked, folder, options) -> ExportResult``: it writes its files into ``folder`` (the
temporary export folder), may add checks (against ``baked.reference`` with
:func:`bake.verify.check.compare`) and load snippets for the model card.  A streamed HF export records
the hooked reference while it writes and returns it in :attr:`ExportResult.reference`; the
orchestrator (:func:`bake.formats.export.export`) hands it to the formats after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bake.errors import BakeError
from bake.formats.baked import Baked
from bake.verify.check import CheckResult, Reference

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GENERATION_FILES = ("generation_config.json",)
REMOTE_CODE_PARAM_SUFFIXES = (".lineas_scale", ".lineas_shift")  # kept in fp32, like the hooks compute


class UnknownFormatError(BakeError, ValueError):
    """An export format nobody registered."""


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float32"
    formats: tuple[str, ...] = ("hf",)
    command: str = ""
    progress: bool | None = False
    max_shard_size: str = "5GB"
    check_runtimes: tuple[str, ...] = ()  # serving runtimes that run the written HF folder (bake.formats.serving)


@dataclass
class ExportResult:
    format: str
    checks: list[CheckResult] = field(default_factory=list)
    load_snippets: list[str] = field(default_factory=list)
    remote_code: bool = False
    has_tokenizer: bool = False
    sites: list = field(default_factory=list)  # per-site divergence of a checked candidate (streamed export)
    reference: Reference | None = None  # the hooked reference this exporter recorded (streamed HF export)


Exporter = Callable[[Baked, Path, ExportOptions], ExportResult]
Publisher = Callable[[Path, Baked, ExportOptions], None]
EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, fn: Exporter) -> Exporter:
    EXPORTERS[name] = fn
    return fn
