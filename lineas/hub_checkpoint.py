"""A Hub id's checkpoint fetched into the Hugging Face cache, so that it bakes like a local folder.

``--model meta-llama/Meta-Llama-3-8B`` (or its alias ``llama-3-8b``) must bake out of core, shard by
shard, like a folder does: loading it whole with transformers would need its float32 weights in
memory.  So a Hub id is first fetched into the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``,
shared with transformers and diffusers) and then read from that snapshot folder.

Only what the bake reads is fetched, as transformers and diffusers would: configs, the safetensors
index, tokenizer files, and the weight files the index names (``model.safetensors`` when there is no
index); never pickled weights, Meta's ``original/`` copies, duplicate ``consolidated.safetensors`` files
or GGUF/ONNX variants, and Python files only with ``trust_remote_code``.  A diffusers pipeline
(``model_index.json``) is fetched by diffusers' own ``DiffusionPipeline.download`` (safetensors, no
variants).  With ``HF_HUB_OFFLINE=1`` the cached snapshot is used as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from lineas.errors import ModelLoadError

# Small files every checkpoint kind may need: configs, the weights index, tokenizers, chat templates.
METADATA_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
REMOTE_CODE_PATTERNS = ("*.py",)  # only with trust_remote_code
IGNORED_PATTERNS = ("original/*",)  # Meta's consolidated .pth checkpoint and its own params/tokenizer
PIPELINE_INDEX = "model_index.json"


class HubFetchError(ModelLoadError):
    """The Hub id could not be fetched (unknown or gated repo, no network and not cached)."""


# One fetch per process (the CLI resolves a model once, the bake again): key -> (folder, shards fetched).
_FETCHED: dict[tuple, tuple[Path, bool]] = {}


def fetch_checkpoint(repo_id: str, *, trust_remote_code: bool = False, shards: bool = True) -> Path:
    """The local snapshot folder of ``repo_id`` with what a bake reads (see the module docstring).

    ``shards=False`` (a dry run, which plans from the config) leaves out the weight files a
    ``model.safetensors.index.json`` names; a single ``model.safetensors`` is fetched either way.
    Raises :class:`HubFetchError` naming ``repo_id`` when the Hub cannot serve it and it is not cached."""
    from huggingface_hub import constants

    key = (repo_id, trust_remote_code, constants.ENDPOINT, constants.HF_HUB_CACHE)
    folder, complete = _FETCHED.get(key, (None, False))
    if folder is None or not folder.is_dir() or shards and not complete:
        folder, complete = _fetch(repo_id, trust_remote_code=trust_remote_code, shards=shards)
        _FETCHED[key] = folder, complete
    return folder


def _fetch(repo_id: str, *, trust_remote_code: bool, shards: bool) -> tuple[Path, bool]:
    """The snapshot folder, and whether it holds every weight file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    code = REMOTE_CODE_PATTERNS if trust_remote_code else ()
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*METADATA_PATTERNS, *code],
                                        ignore_patterns=list(IGNORED_PATTERNS)))
        if (folder / PIPELINE_INDEX).is_file():
            from lineas.pipelines import require_diffusers

            pipe = require_diffusers().DiffusionPipeline.download(repo_id, use_safetensors=True,
                                                                  trust_remote_code=trust_remote_code)
            return Path(pipe), True
        index = folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file() and not shards:
            return folder, False
        weights = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) \
            if index.is_file() else [SAFE_WEIGHTS_NAME]
        # A repo without safetensors weights gets none here: the caller loads it with transformers.
        return Path(snapshot_download(repo_id, allow_patterns=weights)), True
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HubFetchError(f"{repo_id!r}: fetching it from the Hugging Face Hub failed (unknown or gated repo, "
                            f"or the Hub is unreachable and it is not in the local cache): {first}") from None
