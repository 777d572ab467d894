"""Normalising what the user gives as maps: paths, ``SteeringMaps``, ``(maps, strength)`` lists, CLI strings."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save as save_bytes

from lineas.maps import (
    MapsFormatError,
    SiteMap,
    SteeringMaps,
    check_strength,
    effective_maps,
    file_sha256,
)


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


def load_source(maps, strength: float) -> MapsSource:
    strength = check_strength(strength)
    if isinstance(maps, SteeringMaps):
        return MapsSource(maps, strength, "<in-memory>", maps_sha256(maps))
    if isinstance(maps, (str, os.PathLike)):
        path = Path(maps)
        return MapsSource(SteeringMaps.load(path), strength, str(maps), file_sha256(path) if path.is_file() else "")
    raise MapsFormatError(f"maps must be a path or a SteeringMaps object, got {type(maps).__name__}")


def normalise_maps(maps, strength: float = 1.0) -> list[MapsSource]:
    """``maps`` is a path, a ``SteeringMaps``, or a sequence of ``(maps, strength)`` pairs / bare maps
    (a bare entry gets ``strength``)."""
    if isinstance(maps, (str, os.PathLike, SteeringMaps)):
        return [load_source(maps, strength)]
    if not isinstance(maps, Sequence) or not maps:
        raise MapsFormatError("maps must be a path, a SteeringMaps object, or a non-empty list of (maps, strength)")
    out = []
    for item in maps:
        if isinstance(item, tuple) and len(item) == 2:
            out.append(load_source(item[0], item[1]))
        else:
            out.append(load_source(item, strength))
    return out


def combined(sources: Sequence[MapsSource]) -> dict[str, SiteMap]:
    """The effective ``y -> s*y + t`` per site, composed in the given order."""
    return effective_maps([(s.maps, s.strength) for s in sources])


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
