"""What an exporter reads of a bake: the :class:`Baked` protocol (:class:`bake.results.Baked`
is the implementation), and the two records it carries, :class:`BaseModel` and :class:`StreamSource`.

The formats name this protocol, never the API's result type: the API calls the exporters, so they
must not import it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from bake.core.plan_types import FoldPlan
from bake.plan.inputs import MapsSource
from bake.store.stores import FolderStore
from bake.verify.check import Reference, VerificationReport
from lineas.maps import SiteMap


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


class Baked(Protocol):
    """The folded model, where it came from, and what it is checked against."""

    model: nn.Module             # folded weights (a meta skeleton when ``source`` is set)
    tokenizer: object | None
    plan: FoldPlan
    report: VerificationReport   # the in-memory check (streamed bakes: the reference's placeholder)
    maps: Sequence[MapsSource]
    base: BaseModel
    effective: Mapping[str, SiteMap]
    reference: Reference | None  # hooked outputs on the probes; None with verify=False (or not recorded yet)
    source: StreamSource | None  # out-of-core bakes: the source shards the HF export is written from
    base_absmax: Mapping[str, float]  # in-memory bakes: max |value| before the fold of each tensor the plan writes

    @property
    def bakes(self) -> list[dict]: ...
