"""config.json across transformers majors: fields 5.x renamed, which 4.x would silently miss.

transformers 5 writes RoPE settings as ``rope_parameters`` (``{"rope_theta": ..., "rope_type": ...,
...}``, or one such dict per layer type for Gemma-3) where 4.x reads ``rope_theta`` and ``rope_scaling``
(Gemma-3: ``rope_local_base_freq`` for its sliding layers).  4.x reading a 5.x config finds no
``rope_theta`` and silently uses its default: SmolLM2 converted by 5.x and run by 4.57 used theta 10 000
instead of 100 000, logits off by 2.25, no warning.  So:

* every config.json lineas-bake writes under 5.x also carries the 4.x fields (:func:`legacy_rope_fields`;
  5.x itself reads ``rope_parameters`` first and ignores them);
* under 4.x, a checkpoint whose config has ``rope_parameters`` and not ``rope_theta`` is refused with a
  message (:func:`unreadable_by_this_version`) instead of being run with the wrong rotary frequencies.
"""

from __future__ import annotations

import json


def transformers_version() -> str:
    """The installed transformers version: the one place lineas-bake reads it (tests patch this)."""
    import transformers

    return transformers.__version__


def transformers_major() -> int:
    return int(transformers_version().split(".")[0])


def _split_rope(params: dict) -> tuple[float | None, dict | None]:
    """``rope_parameters`` of one layer type -> (rope_theta, rope_scaling as 4.x reads it)."""
    theta = params.get("rope_theta")
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = None if rest.get("rope_type", "default") == "default" else rest
    return theta, scaling


def legacy_rope_fields(cfg: dict) -> dict:
    """The 4.x fields that ``cfg`` (a config.json dict) lacks and its ``rope_parameters`` determine."""
    params = cfg.get("rope_parameters") if isinstance(cfg, dict) else None
    if not isinstance(params, dict) or "rope_theta" in cfg:
        return {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):  # per layer type (Gemma-3)
        theta, scaling = _split_rope(params["full_attention"])
        out = {"rope_theta": theta, "rope_scaling": scaling}
        sliding = params.get("sliding_attention")
        if isinstance(sliding, dict) and sliding.get("rope_theta") is not None:
            out["rope_local_base_freq"] = sliding["rope_theta"]
        return {k: v for k, v in out.items() if k not in cfg and (v is not None or k == "rope_scaling")}
    theta, scaling = _split_rope(params)
    if theta is None:
        return {}
    return {"rope_theta": theta, "rope_scaling": scaling}


def unreadable_by_this_version(cfg: dict) -> str | None:
    """Why the installed transformers 4.x would misread ``cfg``, or None (always None under 5.x)."""
    if transformers_major() >= 5:
        return None
    missing = legacy_rope_fields(cfg)
    if not missing:
        return None
    return (f"config.json was written by transformers {cfg.get('transformers_version', '5.x')}: it has "
            f"rope_parameters but not {', '.join(sorted(missing))}, so transformers {transformers_version()} "
            f"would silently use its default rotary frequencies instead of {cfg['rope_parameters']}. Run under "
            f"transformers 5, or add {json.dumps(missing)} to config.json (lineas-bake exports under 5.x carry both)")
