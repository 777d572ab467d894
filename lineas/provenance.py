"""What a maps file records about the model it was learned on."""

from __future__ import annotations

import hashlib
import json

# Keys that change with how a model was loaded, not with what it is.
_VOLATILE = ("transformers_version", "dtype", "torch_dtype", "use_cache")


AFFINE_MODEL_TYPE_PREFIX = "lineas_"  # an export with lineas affine modules: model_type "lineas_<base>"


def base_model_type(config) -> str:
    """``config.model_type``; for an export with lineas affine modules (``lineas_<base>``, see
    :mod:`bake.fold.remote_code`), the model type of its base: the architecture its modules follow."""
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type.startswith(AFFINE_MODEL_TYPE_PREFIX) and getattr(config, "lineas_affine_sites", None):
        return model_type[len(AFFINE_MODEL_TYPE_PREFIX):]
    return model_type


def config_fingerprint(config) -> str:
    """sha256 of the model config as canonical JSON, without load-dependent keys.

    Private keys (``_name_or_path``, ``_commit_hash``, attention backend) and
    the dtype are dropped, so the same checkpoint loaded from another folder or
    in bf16 has the same fingerprint; in nested sub-configs too (a vision-language
    model's ``text_config`` and ``vision_config`` take the dtype it was loaded in).
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    blob = json.dumps(_stable(d), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _stable(d: dict) -> dict:
    return {k: _stable(v) if isinstance(v, dict) else v for k, v in d.items()
            if not (isinstance(k, str) and (k.startswith("_") or k in _VOLATILE))}


def model_provenance(model, base_model: str | None = None) -> dict[str, str]:
    """``base_model``, ``model_type``, ``config_sha256`` (and ``revision`` when known)."""
    cfg = getattr(model, "config", None)
    meta = {"base_model": base_model or (getattr(cfg, "_name_or_path", "") or type(model).__name__)}
    if cfg is not None:
        meta["model_type"] = base_model_type(cfg)
        meta["config_sha256"] = config_fingerprint(cfg)
        rev = getattr(cfg, "_commit_hash", None)
        if rev:
            meta["revision"] = str(rev)
    else:
        meta["model_type"] = type(model).__name__
    return meta
