"""The `lineas-maps` file format, version 1, and its in-memory form.

A maps file is a safetensors file holding, for every *site* (a module's full
name in ``model.named_modules()``), two float32 1-D tensors of length D:

    <site>.scale   <site>.shift

For the module output ``y`` the map is ``T(y) = scale * y + shift`` along the
feature axis (last dim of ``[..., D]``, dim 1 of ``[B, C, H, W]``).  At
strength ``lam`` the steered output is ``y + lam * (T(y) - y)``, which is the
affine map ``s_lam * y + t_lam`` with ``s_lam = 1 + lam * (scale - 1)`` and
``t_lam = lam * shift``.

Metadata (all strings) must carry ``format = "lineas-maps"`` and
``format_version = "1"``; anything else is rejected by :meth:`SteeringMaps.load`.  Maps learned on a
diffusers pipeline name its sites ``<component>.<module path>`` and carry ``pipeline_class`` (see
:mod:`lineas.pipelines`); v1 readers see one more string entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lineas.io import atomic_write
from lineas.safetensors_check import SafetensorsHeaderError, read_header

FORMAT = "lineas-maps"
FORMAT_VERSION = "1"
_SUFFIXES = (".scale", ".shift")
# Bounds a header is checked against before any tensor is read: far above any real model (the widest
# hidden sizes are ~2**15; a maps file of a 100-layer model holds a few MB), far below what would take
# minutes or all the memory to read.
MAX_SITE_DIM = 1 << 22
MAX_MAPS_BYTES = 1 << 30


class MapsFormatError(ValueError):
    """A maps file or maps object violates the lineas-maps v1 format."""


@dataclass(frozen=True)
class SiteMap:
    """One per-neuron affine map ``T(y) = scale * y + shift`` (float32, 1-D)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("scale", "shift"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise MapsFormatError(f"{name} must be a 1-D tensor, got shape {tuple(getattr(t, 'shape', ()))}")
        if self.scale.shape != self.shift.shape:
            raise MapsFormatError(
                f"scale and shift lengths differ: {self.scale.numel()} vs {self.shift.numel()}"
            )
        # Store detached float32 copies so the object is a value, not a view.
        object.__setattr__(self, "scale", self.scale.detach().to("cpu", torch.float32).clone())
        object.__setattr__(self, "shift", self.shift.detach().to("cpu", torch.float32).clone())

    @property
    def dim(self) -> int:
        return self.scale.numel()

    @classmethod
    def identity(cls, dim: int) -> SiteMap:
        return cls(torch.ones(dim), torch.zeros(dim))

    def at_strength(self, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective ``(s, t)`` of ``y + strength * (T(y) - y)``."""
        check_strength(strength)
        return 1.0 + strength * (self.scale - 1.0), strength * self.shift

    def scaled(self, strength: float) -> SiteMap:
        s, t = self.at_strength(strength)
        return SiteMap(s, t)

    def then(self, other: SiteMap) -> SiteMap:
        """The map ``other(self(y))``: apply ``self`` first, then ``other``."""
        if other.dim != self.dim:
            raise MapsFormatError(f"cannot compose maps of length {self.dim} and {other.dim}")
        return SiteMap(other.scale * self.scale, other.scale * self.shift + other.shift)


def check_strength(strength: float, what: str = "strength") -> float:
    """``strength`` as a finite float, else a :class:`MapsFormatError` naming ``what`` and the value."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise MapsFormatError(f"{what} must be a number, got {strength!r}") from None
    if not math.isfinite(value):
        raise MapsFormatError(f"{what} must be finite, got {strength!r}")
    return value


@dataclass(frozen=True)
class SteeringMaps:
    """An ordered, immutable set of per-site maps plus string metadata.

    Iteration yields site names in application order.
    """

    maps: Mapping[str, SiteMap]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.maps:
            raise MapsFormatError("a maps object needs at least one site")
        for site, m in self.maps.items():
            if not isinstance(m, SiteMap):
                raise MapsFormatError(f"site {site!r}: expected SiteMap, got {type(m).__name__}")
            for name in ("scale", "shift"):
                if not torch.isfinite(getattr(m, name)).all():
                    raise MapsFormatError(f"site {site!r}: {name} has non-finite values")
        bad = {k: v for k, v in self.metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise MapsFormatError(f"metadata keys and values must be strings: {sorted(map(str, bad))}")
        object.__setattr__(self, "maps", MappingProxyType(dict(self.maps)))
        meta = dict(self.metadata)
        meta["format"], meta["format_version"] = FORMAT, FORMAT_VERSION
        meta.setdefault("sites", json.dumps(list(self.maps)))
        object.__setattr__(self, "metadata", MappingProxyType(meta))

    # -- container protocol -------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, site: str) -> SiteMap:
        return self.maps[site]

    def __contains__(self, site: object) -> bool:
        return site in self.maps

    @property
    def sites(self) -> list[str]:
        return list(self.maps)

    def items(self):
        return self.maps.items()

    # -- algebra --------------------------------------------------------------
    def at_strength(self, strength: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site, the effective ``(scale_lam, shift_lam)``."""
        return {site: m.at_strength(strength) for site, m in self.maps.items()}

    def scaled(self, strength: float) -> SteeringMaps:
        meta = dict(self.metadata)
        meta["strength_applied"] = repr(check_strength(strength))
        return SteeringMaps({s: m.scaled(strength) for s, m in self.maps.items()}, meta)

    def support(self, tol: float = 1e-5) -> float:
        """Fraction of coordinates with ``|scale-1| > tol`` or ``|shift| > tol``."""
        active = total = 0
        for m in self.maps.values():
            active += int(((m.scale - 1).abs().gt(tol) | m.shift.abs().gt(tol)).sum())
            total += m.dim
        return active / total

    # -- I/O ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same directory, then rename)."""
        path = Path(path)
        tensors = {}
        for site, m in self.maps.items():
            tensors[site + ".scale"] = m.scale.contiguous()
            tensors[site + ".shift"] = m.shift.contiguous()
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(self.metadata)))

    @classmethod
    def load(cls, path: str | os.PathLike, *, known_sites: Collection[str] | None = None) -> SteeringMaps:
        """Read a maps file.  Its header is validated first (:func:`read_maps_header`), so a malformed or
        absurd file is refused before any tensor is read; ``known_sites``: the sites the model has, checked
        against the header before the tensors are read too (a :class:`MapsFormatError` names the others)."""
        path = Path(path)
        header = read_maps_header(path)
        if known_sites is not None:
            unknown = [s for s in header.sites if s not in known_sites]
            if unknown:
                raise MapsFormatError(f"{path}: unknown site(s) {', '.join(map(repr, unknown[:5]))}"
                                      + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                                      + " (not modules of this model)")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for corrupt files
            raise MapsFormatError(f"{path}: not a readable safetensors file ({e})") from None
        return cls._from_tensors(tensors, header.metadata, origin=str(path))

    @classmethod
    def _from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], origin: str) -> SteeringMaps:
        if meta.get("format") != FORMAT:
            raise MapsFormatError(f"{origin}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise MapsFormatError(
                f"{origin}: unsupported format_version {meta.get('format_version')!r} "
                f"(this tool reads {FORMAT_VERSION!r})"
            )
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise MapsFormatError(f"{origin}: unexpected tensor {key!r} (only '<site>.scale' and '<site>.shift')")
            if t.dtype != torch.float32:
                raise MapsFormatError(f"{origin}: tensor {key!r} has dtype {t.dtype}, expected float32")
            if t.dim() != 1:
                raise MapsFormatError(f"{origin}: tensor {key!r} must be 1-D, got shape {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise MapsFormatError(f"{origin}: tensor {key!r} has non-finite values")
            pairs.setdefault(key[: -len(suffix)], {})[suffix[1:]] = t
        for site, p in pairs.items():
            missing = [n for n in ("scale", "shift") if n not in p]
            if missing:
                raise MapsFormatError(f"{origin}: site {site!r} lacks '{site}.{missing[0]}'")
            if p["scale"].shape != p["shift"].shape:
                raise MapsFormatError(
                    f"{origin}: site {site!r} scale/shift lengths differ ({p['scale'].numel()} vs {p['shift'].numel()})"
                )
        if not pairs:
            raise MapsFormatError(f"{origin}: no sites in file")
        order = _site_order(meta.get("sites"), pairs, origin)
        return cls({s: SiteMap(pairs[s]["scale"], pairs[s]["shift"]) for s in order}, meta)


def _site_order(sites_json: str | None, pairs: Mapping[str, object], origin: str) -> list[str]:
    """Application order from metadata ``sites`` when present, else sorted names."""
    if sites_json is None:
        return sorted(pairs)
    try:
        listed = json.loads(sites_json)
    except (json.JSONDecodeError, RecursionError):
        raise MapsFormatError(f"{origin}: metadata 'sites' is not a JSON list") from None
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        bad = next((s for s in listed if not isinstance(s, str)), listed) if isinstance(listed, list) else listed
        raise MapsFormatError(f"{origin}: metadata 'sites' must be a JSON list of strings (site names), "
                              f"found {json.dumps(bad)[:80]}")
    if len(set(listed)) != len(listed) or sorted(listed) != sorted(pairs):
        raise MapsFormatError(f"{origin}: metadata 'sites' does not list exactly the sites in the file")
    return listed


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def effective_maps(maps_with_strength: list[tuple[SteeringMaps, float]]) -> dict[str, SiteMap]:
    """Compose several (maps, strength) pairs, in order, into one effective map per site.

    The result is what both the hooks and the baker apply: ``y -> s * y + t``.
    """
    out: dict[str, SiteMap] = {}
    for maps, strength in maps_with_strength:
        for site, m in maps.items():
            eff = m.scaled(strength)
            out[site] = out[site].then(eff) if site in out else eff
    return out


@dataclass(frozen=True)
class MapsHeader:
    """What a maps file's header says, validated (no tensor read): sites in application order, each
    site's length, and the metadata."""

    sites: list[str]
    dims: dict[str, int]
    metadata: dict[str, str]


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_maps_header(path: str | os.PathLike) -> MapsHeader:
    """Validate a maps file from its header alone: a regular file, a sound safetensors header
    (:mod:`lineas.safetensors_check`), ``format``/``format_version``, only ``<site>.scale``/``<site>.shift``
    float32 1-D tensors in pairs of equal length at most :data:`MAX_SITE_DIM`, at most :data:`MAX_MAPS_BYTES`
    in all, and a ``sites`` entry (if any) listing exactly those sites as strings.  :class:`MapsFormatError`
    otherwise, naming the file and the value."""
    path = Path(path)
    if path.is_dir():
        raise MapsFormatError(f"maps {path} is a directory, expected a lineas-maps .safetensors file")
    if not path.exists():
        raise MapsFormatError(f"maps file not found: {path}")
    if not path.is_file():
        raise MapsFormatError(f"maps {path} is {_kind(path)}, not a regular file; give a lineas-maps "
                              ".safetensors file")
    try:
        header = read_header(path)
    except SafetensorsHeaderError as e:
        raise MapsFormatError(f"not a readable safetensors file: {e}") from None
    except OSError as e:
        raise MapsFormatError(f"maps {path} cannot be read ({e.strerror or e})") from None
    meta, origin = header.metadata, str(path)
    if meta.get("format") != FORMAT:
        raise MapsFormatError(f"{origin}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MapsFormatError(f"{origin}: unsupported format_version {meta.get('format_version')!r} "
                              f"(this tool reads {FORMAT_VERSION!r})")
    dims: dict[str, dict[str, int]] = {}
    total = 0
    for key, e in header.entries.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise MapsFormatError(f"{origin}: unexpected tensor {key!r} (only '<site>.scale' and '<site>.shift')")
        if e.dtype != "F32":
            raise MapsFormatError(f"{origin}: tensor {key!r} has dtype {e.dtype}, expected F32 (float32)")
        if len(e.shape) != 1:
            raise MapsFormatError(f"{origin}: tensor {key!r} must be 1-D, got shape {e.shape}")
        if e.shape[0] > MAX_SITE_DIM:
            raise MapsFormatError(f"{origin}: tensor {key!r} claims {e.shape[0]} features; no model has a site "
                                  f"that wide (at most {MAX_SITE_DIM} here): a corrupt or hostile file")
        total += e.end - e.begin
        dims.setdefault(key[: -len(suffix)], {})[suffix[1:]] = e.shape[0]
    if total > MAX_MAPS_BYTES:
        raise MapsFormatError(f"{origin}: {total} bytes of maps ({len(dims)} sites); a maps file is at most "
                              f"{MAX_MAPS_BYTES} bytes here: a corrupt or hostile file")
    for site, p in dims.items():
        missing = [n for n in ("scale", "shift") if n not in p]
        if missing:
            raise MapsFormatError(f"{origin}: site {site!r} lacks '{site}.{missing[0]}'")
        if p["scale"] != p["shift"]:
            raise MapsFormatError(f"{origin}: site {site!r} scale/shift lengths differ ({p['scale']} vs {p['shift']})")
    if not dims:
        raise MapsFormatError(f"{origin}: no sites in file")
    order = _site_order(meta.get("sites"), dims, origin)
    return MapsHeader(order, {s: dims[s]["scale"] for s in order}, dict(meta))
