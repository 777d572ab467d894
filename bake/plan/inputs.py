"""Normalising what the user gives as maps: paths, ``SteeringMaps``, ``(maps, strength)`` lists, CLI strings."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from lineas.maps import (
    MapsFormatError,
    SiteMap,
    SteeringMaps,
    check_strength,
    effective_maps,
    file_sha256,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapsSource:
    """One maps object at one strength, with where it came from (for provenance)."""

    maps: SteeringMaps
    strength: float
    origin: str  # the path as given, or "<in-memory>"
    sha256: str  # of the file bytes, or of the canonical safetensors serialisation

    def describe(self) -> dict:
        meta = dict(self.maps.metadata)
        return {
            "origin": self.origin, "sha256": self.sha256, "strength": self.strength,
            "method": meta.get("method", "unknown"), "sites": self.maps.sites,
            "source": meta.get("source"), "target": meta.get("target"),
            "source_sha256": meta.get("source_sha256"), "target_sha256": meta.get("target_sha256"),
            "base_model": meta.get("base_model"), "config_sha256": meta.get("config_sha256"),
            "support": meta.get("support"),
        }


def maps_sha256(maps: SteeringMaps) -> str:
    """Content hash of an in-memory maps object (its safetensors bytes, as ``save`` would write)."""
    tensors = {}
    for site, m in maps.items():
        tensors[site + ".scale"] = m.scale.contiguous()
        tensors[site + ".shift"] = m.shift.contiguous()
    return hashlib.sha256(save_bytes(tensors, metadata=dict(maps.metadata))).hexdigest()


class RepeatedMapsError(MapsFormatError):
    """The same maps (file, or tensors) given twice in one command: the steering would double."""


class NoSteeringError(MapsFormatError):
    """λ = 0, or maps whose effective map is the identity at every site: the export would be unsteered."""


def load_source(maps, strength: float, *, known_sites: Collection[str] | None = None) -> MapsSource:
    """One :class:`MapsSource`; ``known_sites``: the model's sites, checked against a maps file's header
    before its tensors are read (:meth:`lineas.maps.SteeringMaps.load`)."""
    strength = check_strength(strength)
    origin = "<in-memory>" if isinstance(maps, SteeringMaps) else str(maps)
    if strength == 0:
        raise NoSteeringError(f"strength 0 for maps {origin}: λ = 0 changes nothing, and the export would be an "
                              "unsteered copy of the model (give a non-zero λ)")
    if isinstance(maps, SteeringMaps):
        return MapsSource(maps, strength, origin, maps_sha256(maps))
    if isinstance(maps, (str, os.PathLike)):
        path = Path(maps)
        loaded = SteeringMaps.load(path, known_sites=known_sites)  # refuses anything but a regular file
        return MapsSource(loaded, strength, origin, file_sha256(path))
    raise MapsFormatError(f"maps must be a path or a SteeringMaps object, got {type(maps).__name__}")


def normalise_maps(maps, strength: float = 1.0, *, known_sites: Collection[str] | None = None) -> list[MapsSource]:
    """``maps`` is a path, a ``SteeringMaps``, or a sequence of ``(maps, strength)`` pairs / bare maps
    (a bare entry gets ``strength``).  ``known_sites``: see :func:`load_source`."""
    if isinstance(maps, (str, os.PathLike, SteeringMaps)):
        return [load_source(maps, strength, known_sites=known_sites)]
    if not isinstance(maps, Sequence) or not maps:
        raise MapsFormatError("maps must be a path, a SteeringMaps object, or a non-empty list of (maps, strength)")
    out = []
    for item in maps:
        if isinstance(item, tuple) and len(item) == 2:
            out.append(load_source(item[0], item[1], known_sites=known_sites))
        else:
            out.append(load_source(item, strength, known_sites=known_sites))
    return out


def content_digest(maps: SteeringMaps) -> str:
    """sha256 over the sites and values only (not the metadata): two files that differ only in their
    metadata hold the same maps."""
    h = hashlib.sha256()
    for site, m in maps.items():
        h.update(site.encode() + b"\0")
        h.update(m.scale.numpy().tobytes())
        h.update(m.shift.numpy().tobytes())
    return h.hexdigest()


def check_repeated(sources: Sequence, *, allow: bool) -> None:
    """Refuse the same maps given twice in one command (the same file by sha256, or the same sites and
    values under other metadata, at any strengths): composed, the steering would apply twice, which a
    re-bake of the export is refused for too.  ``allow`` (``--allow-rebake``): a warning instead.
    ``sources``: :class:`MapsSource` objects or their records (dicts with ``origin`` and ``sha256``)."""
    seen: dict[str, str] = {}
    for s in sources:
        origin, sha = (s.get("origin"), s.get("sha256")) if isinstance(s, dict) else (s.origin, s.sha256)
        keys = [k for k in (sha, None if isinstance(s, dict) else "content:" + content_digest(s.maps)) if k]
        first = next((seen[k] for k in keys if k in seen), None)
        if first is not None:
            how = "the same file" if sha in seen else "the same maps (sites and values)"
            msg = (f"maps {origin} and {first} are {how}, given twice in one command: composed, the steering "
                   "would apply twice")
            if not allow:
                raise RepeatedMapsError(msg + ". Pass --allow-rebake (allow_rebake=True) if that is what you want")
            log.warning("%s; going on because --allow-rebake was given", msg)
        for k in keys:
            seen.setdefault(k, origin)


def is_identity(m: SiteMap) -> bool:
    """Whether ``m`` changes nothing: scale exactly 1, shift 0 or subnormal (a λ so small it underflowed)."""
    return bool((m.scale == 1).all()) and bool((m.shift.abs() < torch.finfo(torch.float32).tiny).all())


def combined(sources: Sequence[MapsSource]) -> dict[str, SiteMap]:
    """The effective ``y -> s*y + t`` per site, composed in the given order.  :class:`NoSteeringError` when it
    is the identity at every site (a λ that underflows float32, or maps that cancel out): the export would be an
    unsteered copy, whatever its card says."""
    eff = effective_maps([(s.maps, s.strength) for s in sources])
    if eff and all(is_identity(m) for m in eff.values()):
        lams = ", ".join(f"{s.origin} at λ = {s.strength:g}" for s in sources)
        raise NoSteeringError(f"the effective maps ({lams}) are the identity at every site (scale 1, shift 0 in "
                              "float32): these maps at this λ change nothing, and the export would be an unsteered "
                              "copy of the model (raise the strength, or check the maps)")
    return eff


def parse_maps_arg(text: str, default_strength: float) -> tuple[str, float]:
    """CLI ``--maps F`` or ``--maps F:lambda``. An existing path wins over a ``:lambda`` suffix.

    When ``F`` exists but ``lambda`` is not a number, that is a bad suffix, not a missing file.
    """
    if Path(text).exists() or ":" not in text:
        return text, check_strength(default_strength, "--strength")
    path, _, lam = text.rpartition(":")
    try:
        value = float(lam)
    except ValueError:
        if Path(path).exists():
            raise MapsFormatError(f"--maps {text!r}: bad strength suffix {lam!r} (expected F or F:λ with λ a "
                                  "number, e.g. F:0.5)") from None
        return text, check_strength(default_strength, "--strength")  # a path containing ':'; load() will complain
    return path, check_strength(value, f"strength for {path!r}")


MAX_PLAIN_STRENGTH = 10.0  # |λ| above this needs --allow-large-strength: the steering then dwarfs the model


def check_strength_magnitude(strength: float, what: str, allow_large: bool) -> float:
    """Refuse |strength| > :data:`MAX_PLAIN_STRENGTH` unless ``allow_large`` (a typo like 1e9 is never meant)."""
    if abs(strength) > MAX_PLAIN_STRENGTH and not allow_large:
        raise MapsFormatError(f"{what} is {strength:g}: |λ| above {MAX_PLAIN_STRENGTH:g} multiplies the steering "
                              "far beyond what the maps were learned for. Pass --allow-large-strength if it is "
                              "intended")
    return strength
