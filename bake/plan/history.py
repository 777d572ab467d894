"""What was baked into a model, and the two refusals that record makes possible.

Every fold appends an entry to the model config's ``lineas_baked`` list (see
:func:`bake.fold.execute.apply_plan`), so it travels inside ``config.json`` of the
export (like PEFT remembering merged adapters).  An entry holds each maps
file's sha256 and strength, the effective-maps digest, the number of sites, the
config fingerprint of the model *before* that fold and the tool version.

* :func:`check_rebake`: maps already baked in (same file sha256 or same
  effective digest) are refused unless ``allow_rebake``: a second bake doubles
  the steering.  Exports written before this record existed are recognised by
  their ``lineas_provenance.json``.
* :func:`check_model_match`: maps whose metadata names another ``model_type`` or
  ``config_sha256`` than the model are refused unless ``ignore_mismatch``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bake.errors import BakeError
from bake.plan.inputs import check_repeated
from lineas.provenance import base_model_type, config_fingerprint

PROVENANCE_FILE = "lineas_provenance.json"  # beside the export; records every bake, read back here

log = logging.getLogger(__name__)

BAKED_KEY = "lineas_baked"


class RebakeError(BakeError, ValueError):
    """The maps are already baked into this model."""


class ModelMismatchError(BakeError, ValueError):
    """The maps were learned on another model (``model_type`` or ``config_sha256`` differ)."""


class BakeRecordError(BakeError, ValueError):
    """A ``lineas_baked`` record (config.json) or a provenance file that is not what lineas-bake writes: the
    re-bake check cannot read it, so the bake is refused rather than run blind."""


# The fields of an entry that the checks read, with the types they must have (others are kept as they are).
_ENTRY_FIELDS = {"maps": list, "effective_digest": (str, type(None)), "shift_in_consumers": list,
                 "base_config_sha256": str}


def _checked_entry(entry, where: str) -> dict:
    """``entry`` as a dict whose read fields have the types the checks expect; else :class:`BakeRecordError`."""
    if not isinstance(entry, dict):
        raise BakeRecordError(f"{where} is {_json_kind(entry)}, expected an object (a record of one bake); "
                              "the file was edited or is not from lineas-bake")
    for key, kind in _ENTRY_FIELDS.items():
        if key in entry and not isinstance(entry[key], kind):
            raise BakeRecordError(f"{where}: {key} is {_json_kind(entry[key])} ({str(entry[key])[:60]!r}), which "
                                  "lineas-bake never writes; the re-bake check cannot read it")
    for i, m in enumerate(entry.get("maps", [])):
        if not isinstance(m, dict) or not isinstance(m.get("sha256", ""), str):
            raise BakeRecordError(f"{where}: maps[{i}] is not a maps record with a sha256 string ({str(m)[:60]!r})")
    if not all(isinstance(s, str) for s in entry.get("shift_in_consumers", [])):
        raise BakeRecordError(f"{where}: shift_in_consumers holds a non-string site name")
    return dict(entry)


def _json_kind(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


@dataclass(frozen=True)
class EarlierBake:
    entry: dict  # one ``lineas_baked`` entry
    where: str  # where it was recorded, for messages


def recorded_bakes(config) -> list[dict]:
    """The config's ``lineas_baked`` list (a copy; empty for a model never baked); a
    :class:`BakeRecordError` naming the entry when it is not a list of bake records."""
    record = getattr(config, BAKED_KEY, None) if config is not None else None
    if not record:
        return []
    if not isinstance(record, list):
        raise BakeRecordError(f"config.json {BAKED_KEY} is {_json_kind(record)} ({str(record)[:60]!r}), expected "
                              "the list of bake records lineas-bake writes")
    return [_checked_entry(e, f"config.json {BAKED_KEY}[{i}]") for i, e in enumerate(record)]


def new_entry(config, *, effective_digest: str, sites: Sequence[str], shift_in_consumers: Sequence[str],
              maps: Sequence[dict]) -> dict:
    """The record of one bake, made at fold time from the config *before* the fold changes it.
    ``shift_in_consumers``: sites whose shift went into the biases of the modules that read them."""
    from lineas import __version__

    return {
        "tool": "lineas-bake", "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "maps": [dict(m) for m in maps], "effective_digest": effective_digest, "sites": len(sites),
        "site_names": list(sites), "shift_in_consumers": list(shift_in_consumers),
        "base_config_sha256": config_fingerprint(config) if config is not None else "",
    }


def warn_stacked_sites(earlier: Sequence[EarlierBake], sites) -> None:
    """New maps at a site whose earlier shift lives in consumer biases act on an output without that shift:
    baked-then-baked is then not the same as both maps hooked on the base model. Say so."""
    for prior in earlier:
        shared = sorted(set(sites) & set(prior.entry.get("shift_in_consumers", [])))
        if shared:
            log.warning("site(s) %s were steered by an earlier bake (%s) whose shift was folded into the modules "
                        "that read them; the new maps act on the baked output without that shift, so the result "
                        "equals these maps hooked on the baked model, not both maps hooked on the base model. "
                        "Learn the new maps on the baked model (lineas-train --model <this export>) for that",
                        ", ".join(shared), prior.where)


def maps_records(sources) -> list[dict]:
    """What an entry keeps of each :class:`bake.plan.inputs.MapsSource`."""
    return [{"origin": Path(s.origin).name, "sha256": s.sha256, "strength": s.strength,
             "method": dict(s.maps.metadata).get("method", "unknown")} for s in sources]


def _provenance_bakes(folder: Path) -> list[dict]:
    """Entries from an export's provenance file: its ``bakes`` list, or one entry made of its ``maps``; a
    :class:`BakeRecordError` naming the file when it cannot be read as one."""
    path = folder / PROVENANCE_FILE
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BakeRecordError(f"{path} cannot be read ({e}): the re-bake check needs it; restore it, or move it "
                              "away if this folder's earlier bakes do not matter") from None
    if not isinstance(prov, dict):
        raise BakeRecordError(f"{path} is {_json_kind(prov)}, expected the object lineas-bake writes")
    bakes = prov.get("bakes")
    if bakes:
        if not isinstance(bakes, list):
            raise BakeRecordError(f"{path}: bakes is {_json_kind(bakes)}, expected a list of bake records")
        return [_checked_entry(e, f"{path}: bakes[{i}]") for i, e in enumerate(bakes)]
    base_model = prov.get("base_model") or {}
    if not isinstance(base_model, dict):
        raise BakeRecordError(f"{path}: base_model is {_json_kind(base_model)}, expected an object")
    legacy = _checked_entry({"maps": prov.get("maps", []), "base_config_sha256": base_model.get("config_sha256", "")},
                            str(path))
    maps = [{"origin": Path(str(m.get("origin", "?"))).name, "sha256": m.get("sha256", ""),
             "strength": m.get("strength")} for m in legacy["maps"]]
    base = legacy["base_config_sha256"]
    return [{"tool": "lineas-bake", "maps": maps, "effective_digest": None, "base_config_sha256": base}] if maps else []


def earlier_bakes(config, model_path: str) -> list[EarlierBake]:
    """Bakes recorded in the config, else (an export from before the config record) in its provenance file."""
    name = model_path or "the model"
    found = [EarlierBake(e, f"config.json {BAKED_KEY}[{i}] of {name}") for i, e in enumerate(recorded_bakes(config))]
    folder = Path(model_path).expanduser() if model_path else None
    if not found and folder is not None and (folder / PROVENANCE_FILE).is_file():
        found = [EarlierBake(e, str(folder / PROVENANCE_FILE)) for e in _provenance_bakes(folder)]
    return found


def legacy_entries(config, earlier: Sequence[EarlierBake]) -> list[dict]:
    """Earlier bakes known only from a provenance file (to be written into the config record too)."""
    return [] if recorded_bakes(config) else [e.entry for e in earlier]


def check_rebake(earlier: Sequence[EarlierBake], sources, effective_digest: str, *, allow: bool) -> None:
    """The one re-bake rule of both families: maps already baked in (a recorded maps file with the same
    sha256, whatever its strength, or the same effective digest) are refused unless ``allow`` (then a
    warning).  ``sources``: :class:`bake.plan.inputs.MapsSource` objects or their records (dicts with
    ``origin`` and ``sha256``, as :func:`maps_records` writes them)."""
    check_repeated(sources, allow=allow)  # the same maps twice in this very command steer twice as well
    files = [(s["origin"], s["sha256"]) if isinstance(s, dict) else (s.origin, s.sha256) for s in sources]
    for prior in earlier:
        shas = {m.get("sha256") for m in prior.entry.get("maps", [])} - {"", None}
        repeated = [(origin, sha) for origin, sha in files if sha in shas]
        same_effect = prior.entry.get("effective_digest") == effective_digest
        if not repeated and not same_effect:
            continue
        what = (", ".join(f"{origin} (sha256 {sha[:12]})" for origin, sha in repeated) if repeated
                else f"maps with effective digest {effective_digest[:12]}")
        msg = (f"already baked into this model: {what} (recorded in {prior.where}); baking again would apply "
               "the steering twice")
        if not allow:
            raise RebakeError(msg + ". Pass --allow-rebake (allow_rebake=True) if that is what you want")
        log.warning("%s; going on because --allow-rebake was given", msg)


def check_model_match(config, sources, earlier: Sequence[EarlierBake], model_name: str, *, ignore: bool) -> None:
    if config is None:
        return
    model_type = base_model_type(config)  # an export with affine modules ("lineas_<base>") is of its base's type
    # The config of an already-baked model differs from the one its maps were learned on: the fold may have
    # switched bias flags and it carries the lineas_baked record.  Maps learned on the baked model match its
    # current fingerprint; maps learned on the original base match the pre-fold fingerprint each entry keeps.
    accepted = {config_fingerprint(config)} | {e.entry.get("base_config_sha256") for e in earlier}
    accepted.discard("")
    problems = []
    for s in sources:
        meta = dict(s.maps.metadata)
        if meta.get("model_type") and model_type and meta["model_type"] != model_type:
            problems.append(f"maps {s.origin} were learned on model_type {meta['model_type']!r}, but {model_name} "
                            f"is model_type {model_type!r}")
        elif meta.get("config_sha256") and meta["config_sha256"] not in accepted:
            problems.append(f"maps {s.origin} were learned on a model with config_sha256 "
                            f"{meta['config_sha256'][:16]}, but {model_name} has config_sha256 "
                            f"{config_fingerprint(config)[:16]} (nor is it the base of a bake recorded in it)")
    if not problems:
        return
    msg = "; ".join(problems) + "; the maps may address other neurons than the ones they were learned on"
    if not ignore:
        raise ModelMismatchError(msg + ". Pass --ignore-model-mismatch (ignore_model_mismatch=True) to bake anyway")
    log.warning("MODEL MISMATCH, baking anyway (--ignore-model-mismatch): %s", msg)
