"""Import hooks saved by apple/ml-act (Linear-AcT) and apple/ml-lineas (LinEAS).

Layout (from ml-act's ``act/hooks/transport.py``, ``LearnableOTHook.state_dict``):
each hook is saved with ``torch.save(hook.state_dict(), "<module>[:idx].statedict")``
and holds

* ``net.w1``, ``net.b1`` -- float tensors of shape ``(1, D)``: the affine map
  ``z -> w1 * z + b1`` on the module output (``LinearProj``);
* ``quantiles_src`` -- which source-quantile gate the hook applies.  Saved after
  fitting, so ``"q_all"`` has already become ``[-1e6, 1e6]``; another gate
  (``"q_0_100"``, ...) becomes a pair of per-neuron tensors.  Only an
  unbounded gate is affine everywhere;
* ``quantiles_dict_src`` -- per-neuron source quantiles (ignored here);
* optionally ``hook_*`` arguments.

The ``:idx`` suffix selects an element of a tuple output; lineas maps always
steer element 0, so other indices are refused.  ml-lineas (LinEAS) hooks store
the same ``net.w1``/``net.b1`` and may lack the quantile keys.  Other ``net.*``
parameters (e.g. ``net.A``, a full matrix) mean a non-diagonal map: refused.

Files are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickles.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch

from lineas.maps import SiteMap, SteeringMaps, file_sha256

log = logging.getLogger(__name__)

SUFFIX = ".statedict"
UNBOUNDED = 1e6  # ml-act's "q_all" gate is (-1e6, 1e6)


class MlActImportError(ValueError):
    """An ml-act/ml-lineas hook file cannot be imported as an affine map."""


def import_mlact(path: str | Path, *, ignore_quantile_gate: bool = False, base_model: str = "") -> SteeringMaps:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*" + SUFFIX), key=lambda p: _natural_key(p.name))
        if not files:
            raise MlActImportError(f"{path}: no '*{SUFFIX}' files in folder")
    elif path.is_file():
        files = [path]
    else:
        raise MlActImportError(f"not found: {path}")

    maps: dict[str, SiteMap] = {}
    gated: list[str] = []
    sources = []
    for f in files:
        site, scale, shift, gate = read_hook(f)
        if gate is not None:
            if not ignore_quantile_gate:
                raise MlActImportError(
                    f"{f.name}: hook was fitted with quantiles_src={gate} (not q_all): it only transports activations "
                    "inside a quantile range, which is piecewise, not affine, and cannot be baked. "
                    "Pass --ignore-quantile-gate to import it as a plain affine map anyway.")
            log.warning("IMPORTING GATED HOOK %s (quantiles_src=%s) AS A PLAIN AFFINE MAP: it will steer every "
                        "activation, unlike the original", f.name, gate)
            gated.append(site)
        if site in maps:
            raise MlActImportError(f"{f.name}: a second hook for site {site!r}")
        maps[site] = SiteMap(scale, shift)
        sources.append({"file": f.name, "sha256": file_sha256(f)})
    meta = {
        "method": "imported-mlact",
        "base_model": base_model,
        "pooling": "mean",
        "source": str(path),
        "imported_from": json.dumps(sources),
        "sites": json.dumps(list(maps)),
    }
    if gated:
        meta["quantile_gate_ignored"] = json.dumps(gated)
    return SteeringMaps(maps, meta)


def read_hook(f: Path) -> tuple[str, torch.Tensor, torch.Tensor, str | None]:
    """``(site, scale, shift, gate)``; ``gate`` is None for an ungated (q_all) hook."""
    if not f.name.endswith(SUFFIX):
        raise MlActImportError(f"{f}: expected a '<module>[:idx]{SUFFIX}' file")
    name = f.name[: -len(SUFFIX)]
    site, _, idx = name.partition(":")
    if idx and idx != "0":
        raise MlActImportError(f"{f.name}: hook on output element {idx}; lineas maps steer element 0 only")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as e:
        # UnpicklingError: non-allowlisted objects; RuntimeError/EOFError: corrupt or truncated archives
        raise MlActImportError(f"{f.name}: not loadable with torch.load(weights_only=True): {e}") from None
    if not isinstance(state, dict):
        raise MlActImportError(f"{f.name}: expected a state dict, got {type(state).__name__}")
    for key in ("net.w1", "net.b1"):
        if not isinstance(state.get(key), torch.Tensor):
            raise MlActImportError(f"{f.name}: missing tensor {key!r} (keys: {sorted(map(str, state))[:8]})")
    extra = [k for k in state if isinstance(k, str) and k.startswith("net.") and k not in ("net.w1", "net.b1")]
    if extra:
        raise MlActImportError(f"{f.name}: has {extra}; only diagonal affine maps (net.w1, net.b1) can be imported")
    w1, b1 = state["net.w1"], state["net.b1"]
    if w1.shape != b1.shape or w1.dim() > 2 or (w1.dim() == 2 and w1.shape[0] != 1):
        raise MlActImportError(f"{f.name}: net.w1 {tuple(w1.shape)} and net.b1 {tuple(b1.shape)} must both be (1, D)")
    scale, shift = w1.reshape(-1).float(), b1.reshape(-1).float()
    if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        raise MlActImportError(f"{f.name}: net.w1/net.b1 hold non-finite values")
    return site, scale, shift, _gate(state.get("quantiles_src", "q_all"))


def _gate(q) -> str | None:
    """None when the quantile gate lets everything through, else a description of it."""
    if isinstance(q, str):
        return None if q == "q_all" else repr(q)
    if isinstance(q, (list, tuple)) and len(q) == 2:
        lo, hi = q
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= -UNBOUNDED and hi >= UNBOUNDED:
            return None  # "q_all" after ml-act's _post_load
        if isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor):
            return f"per-neuron range [{float(lo.min()):.3g}, {float(hi.max()):.3g}]"
    return repr(q)[:80]


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
