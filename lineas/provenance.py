"""What a maps file records about the model it was learned on."""

from __future__ import annotations

import hashlib
import json

# Keys that change with how a model was loaded, not with what it is.
_VOLATILE = ("transformers_version", "dtype", "torch_dtype", "use_cache")


def config_fingerprint(config) -> str:
    """sha256 of the model config as canonical JSON, without load-dependent keys.

    Private keys (``_name_or_path``, ``_commit_hash``, attention backend) and
    the dtype are dropped, so the same checkpoint loaded from another folder or
    in bf16 has the same fingerprint.
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    clean = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE}
    blob = json.dumps(clean, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_provenance(model, base_model: str | None = None) -> dict[str, str]:
    """``base_model``, ``model_type``, ``config_sha256`` (and ``revision`` when known)."""
    cfg = getattr(model, "config", None)
    meta = {"base_model": base_model or (getattr(cfg, "_name_or_path", "") or type(model).__name__)}
    if cfg is not None:
        meta["model_type"] = str(getattr(cfg, "model_type", "") or "")
        meta["config_sha256"] = config_fingerprint(cfg)
        rev = getattr(cfg, "_commit_hash", None)
        if rev:
            meta["revision"] = str(rev)
    else:
        meta["model_type"] = type(model).__name__
    return meta
