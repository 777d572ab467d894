"""The affine fallback module: ``y -> s * y + t`` after a module whose output cannot be folded.

This file imports only torch and the torch-only :mod:`lineas.axis` (the one
feature-axis rule): its source, with that import replaced by the source of
``lineas/axis.py``, is copied into the ``modeling_lineas.py`` written next to
an exported checkpoint, so the baked
model loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
without lineas-bake installed.  It is plain torch (no hooks), so tracing and
ONNX export see it as ordinary graph ops.
"""

import torch
from torch import nn

from lineas.axis import affine_on_axis  # lineas-bake: inline lineas/axis.py

LINEAS_AFFINE_VERSION = 1


class LineasAffine(nn.Module):
    """Wraps ``inner`` and applies ``scale * y + shift`` to its output on the feature axis.

    * computed in float32 and cast back to the output dtype, exactly as the steering hooks do;
    * ``axis``: -1 (last dim) or 1 (channels of ``[B, C, H, W]``); None means the rank rule
      (1 for 4-D outputs, else -1), as in the hooks (:func:`lineas.axis.feature_axis`);
    * tuple/list outputs: the map acts on element 0;
    * ``scale=False`` keeps only the shift (used when the scale was folded into weights).

    Parameters are named ``lineas_scale`` / ``lineas_shift`` and the wrapped module is
    ``inner``, so the state-dict keys of a wrapped site ``S`` are ``S.inner.*``,
    ``S.lineas_scale`` and ``S.lineas_shift``.  Attribute reads and writes that the
    wrapper does not own go to ``inner`` (transformers reads e.g. ``layer.attention_type``
    and ties ``lm_head.weight``).
    """

    _own = ("inner", "axis", "lineas_scale", "lineas_shift")

    def __init__(self, inner: nn.Module, dim: int, axis=-1, scale: bool = True, shift: bool = True):
        super().__init__()
        if not (scale or shift):
            raise ValueError("LineasAffine needs a scale, a shift or both")
        self.inner = inner
        self.axis = axis
        # float32 whatever the model dtype: the map is applied in float32 like the hooks.
        self.lineas_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False) if scale else None
        self.lineas_shift = nn.Parameter(torch.zeros(dim, dtype=torch.float32), requires_grad=False) if shift else None

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        return affine_on_axis(y, self.lineas_scale, self.lineas_shift, self.axis)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, (tuple, list)):
            return type(out)((self._affine(out[0]), *out[1:]))
        return self._affine(out)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in LineasAffine._own or name.startswith("__"):
                raise
            return getattr(super().__getattr__("inner"), name)

    def __setattr__(self, name, value):
        inner = self.__dict__.get("_modules", {}).get("inner")
        # The wrapper's own methods (forward) and private state (accelerate's _hf_hook/_old_forward when
        # it dispatches a model) stay on the wrapper: handing them to inner would make forward recurse.
        owned = (name in LineasAffine._own or name in self.__dict__ or name.startswith("_")
                 or hasattr(type(self), name)
                 or name in self.__dict__.get("_parameters", {}) or name in self.__dict__.get("_buffers", {}))
        if inner is not None and not owned and hasattr(inner, name):
            setattr(inner, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        parts = [f"axis={self.axis}"]
        parts.append("scale" if self.lineas_scale is not None else "no scale")
        parts.append("shift" if self.lineas_shift is not None else "no shift")
        return ", ".join(parts)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _rename_tied_keys(model: nn.Module, sites: list) -> None:
    """Rewrite the model's tied-weight names under wrapped sites (``S.weight`` -> ``S.inner.weight``).

    transformers 4.x keeps ``_tied_weights_keys`` as a list of tied target names; 5.x keeps a dict
    ``{target: source}`` there and, from ``post_init``, its expansion in ``all_tied_weights_keys``
    (saving checks shared tensors against it, loading ties from it).  Targets and sources are renamed.
    """
    def renamed(key):
        if not isinstance(key, str):
            return key
        for site in sites:
            if key.startswith(site + "."):
                return site + ".inner." + key[len(site) + 1:]
        return key

    for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
        tied = getattr(model, attr, None)
        if isinstance(tied, dict):
            setattr(model, attr, {renamed(k): renamed(v) for k, v in tied.items()})
        elif isinstance(tied, (list, tuple)):
            setattr(model, attr, [renamed(k) for k in tied])


def wrap_affine_sites(model: nn.Module, sites) -> dict:
    """Wrap each listed site in a :class:`LineasAffine` (identity until weights are loaded).

    ``sites``: dicts with ``site``, ``dim``, ``axis``, ``scale``, ``shift`` (the config field
    ``lineas_affine_sites``).  Returns ``{site: LineasAffine}``.  Tied-weight names under a
    wrapped site are rewritten (``S.weight`` -> ``S.inner.weight``) so saving and tying still work.
    """
    wrapped = {}
    for spec in sites:
        site = spec["site"]
        inner = model.get_submodule(site)
        if isinstance(inner, LineasAffine):
            raise ValueError(f"site {site!r} is already wrapped")
        module = LineasAffine(inner, int(spec["dim"]), spec.get("axis", -1),
                              bool(spec.get("scale", True)), bool(spec.get("shift", True)))
        try:
            ref = next(inner.parameters())
            module.to(device=ref.device)
        except StopIteration:
            pass
        _set_submodule(model, site, module)
        wrapped[site] = module
    if wrapped:
        _rename_tied_keys(model, list(wrapped))
    return wrapped
