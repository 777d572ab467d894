"""The header check every safetensors file of a checkpoint passes before any of its tensors is read.

The validator itself is :mod:`lineas.safetensors_check` (lineas reads maps files with it and must not
import ``bake``); this module adds what a checkpoint reader needs on top: an unreadable file (a missing or
unopenable shard) is refused with the same error type as a malformed one, naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from bake.errors import BakeError
from lineas.safetensors_check import DTYPE_BITS, Header, HeaderEntry, SafetensorsHeaderError, read_header

__all__ = ["DTYPE_BITS", "ConfigMismatchError", "Header", "HeaderEntry", "SafetensorsHeaderError",
           "check_config_against_weights", "checked_header"]


def checked_header(path: str | os.PathLike) -> Header:
    """The validated header of ``path``; :class:`SafetensorsHeaderError` for a file that is missing, is not a
    regular file, cannot be read, or whose header is malformed (:func:`lineas.safetensors_check.read_header`)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise SafetensorsHeaderError(f"{path} is not a regular file")
    try:
        return read_header(path)
    except OSError as e:
        raise SafetensorsHeaderError(f"{path} cannot be read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- config vs weights
_LAYER = re.compile(r"^(.*?)(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
               "tok_embeddings.weight")
# Configs whose embedding width is not hidden_size (an input projection follows the embedding).
_OTHER_EMBEDDING_WIDTH = ("word_embed_proj_dim", "embedding_size", "embed_dim", "d_embed",
                          "hidden_size_per_layer_input")


class ConfigMismatchError(BakeError, ValueError):
    """config.json disagrees with the checkpoint's weights (layer count, width) or holds impossible sizes."""


def _weight_shapes(folder: Path) -> dict[str, tuple[int, ...] | None]:
    """Tensor name -> shape (None: named by the index, its shard not here) from the headers only."""
    index = folder / "model.safetensors.index.json"
    shapes: dict[str, tuple[int, ...] | None] = {}
    files: list[str] = []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError):
            return {}  # the index reader refuses it, naming the problem
        if not isinstance(weight_map, dict):
            return {}
        shapes.update(dict.fromkeys((k for k in weight_map if isinstance(k, str)), None))
        files = sorted({v for v in weight_map.values()  # plain names only: the index reader refuses the others
                        if isinstance(v, str) and "/" not in v and "\\" not in v and v not in ("", ".", "..")})
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    for name in files:
        path = folder / name
        try:
            shapes.update({k: e.shape for k, e in checked_header(path).entries.items()})
        except SafetensorsHeaderError:  # missing or malformed: the shard reader refuses it, naming the problem
            continue
    return shapes


def _positive_int(config, key: str):
    value = getattr(config, key, None)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigMismatchError(f"config.json {key} is {value!r}, expected a positive integer")
    return value


def check_config_against_weights(folder: str | os.PathLike, config) -> None:
    """Refuse, before a skeleton is built from ``config``, a config.json that cannot describe the checkpoint in
    ``folder``: ``num_hidden_layers`` larger than the number of layers the weights hold (a config claiming 10**6
    layers would otherwise build for minutes, growing memory), or a ``hidden_size`` other than the width of
    the input embedding.  Only the safetensors headers (or the index's names) are read; what they do not
    tell is not checked."""
    folder = Path(folder)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = _positive_int(text, "num_hidden_layers")
    hidden = _positive_int(text, "hidden_size")
    shapes = _weight_shapes(folder)
    if not shapes:
        return
    stacks: dict[str, set[int]] = {}
    for name in shapes:
        m = _LAYER.match(name)
        if m:
            stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    if layers is not None and stacks:
        held = max(len(v) for v in stacks.values())
        if layers > held:
            prefix, idx = max(stacks.items(), key=lambda kv: len(kv[1]))
            raise ConfigMismatchError(
                f"{folder / 'config.json'} says num_hidden_layers={layers}, but the weights hold {held} layer(s) "
                f"({prefix + '.' if prefix else ''}layers {min(idx)}-{max(idx)}): is this config.json for "
                "these weights?")
    if hidden is not None and not any(getattr(text, k, None) for k in _OTHER_EMBEDDING_WIDTH):
        for name, shape in shapes.items():
            if shape is not None and len(shape) == 2 and name.endswith(_EMBEDDINGS) and "vision" not in name:
                if shape[1] != hidden:
                    raise ConfigMismatchError(
                        f"{folder / 'config.json'} says hidden_size={hidden}, but the input embedding {name} of the "
                        f"weights is {shape[0]} x {shape[1]}: is this config.json for these weights?")
                break
