"""Where the fold reads tensor values from: one interface, two backings.

The plan addresses tensors by their parameter names (``model.layers.3.input_layernorm.weight``).
:class:`ModuleStore` reads them from an ``nn.Module`` in memory (the Python API);
:class:`FolderStore` reads them lazily from the safetensors shards of a checkpoint folder,
with names resolved the way transformers resolves them (a tied ``lm_head.weight`` is stored
once, under ``model.embed_tokens.weight``).  :func:`bake.fold.execute.compute_folded` runs the same
fold code on either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from bake.errors import BakeError, FoldError
from bake.store.shards import ShardFolder


class TensorStore(Protocol):
    def has(self, name: str) -> bool: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str) -> torch.Tensor:
        """The current value (its stored dtype, on :attr:`device`)."""
        ...

    @property
    def device(self) -> torch.device: ...


class ModuleStore:
    """The parameters of a model in memory (tied parameters under every name)."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters(remove_duplicate=False))
        first = next(iter(self.params.values()), None)
        self._device = first.device if first is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    def has(self, name: str) -> bool:
        return name in self.params

    def dtype(self, name: str) -> torch.dtype:
        return self.params[name].dtype

    def read(self, name: str) -> torch.Tensor:
        return self.params[name].detach()


def checkpoint_keys(skeleton: nn.Module, folder: ShardFolder) -> dict[str, str]:
    """Parameter name of ``skeleton`` -> the key that holds its value in ``folder``.

    Tied parameters share one Parameter object in the skeleton; the checkpoint stores one of
    their names.  A ``base_model_prefix`` missing from the stored keys (a checkpoint saved
    from the bare base model) is accepted too.
    """
    by_id: dict[int, list[str]] = {}
    names = list(dict(skeleton.named_parameters(remove_duplicate=False)))
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    for n in names:
        by_id.setdefault(id(params[n]), []).append(n)
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    out: dict[str, str] = {}
    for n in names:
        for cand in by_id[id(params[n])]:
            if cand in folder:
                out[n] = cand
                break
            if prefix and cand.startswith(prefix + ".") and cand[len(prefix) + 1:] in folder:
                out[n] = cand[len(prefix) + 1:]
                break
    check_shapes(skeleton, folder, out)
    return out


class ShapeMismatchError(BakeError, ValueError):
    """A stored tensor whose shape is not the one ``config.json`` gives its parameter (the config was edited,
    or belongs to another checkpoint)."""


_SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "n_embd", "n_inner")


def check_shapes(skeleton: nn.Module, folder: ShardFolder, keys: Mapping[str, str]) -> None:
    """Refuse a checkpoint whose stored shapes disagree with the skeleton ``config.json`` builds (from the
    headers: no tensor is read), naming the first tensor and the config fields its expected shape comes from."""
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    for name, key in keys.items():
        expected, stored = tuple(params[name].shape), tuple(folder.info(key).shape)
        if expected == stored:
            continue
        config = getattr(skeleton, "config", None)
        fields = [f"{f} {getattr(config, f)}" for f in _SIZE_FIELDS
                  if isinstance(getattr(config, f, None), int) and getattr(config, f) in expected
                  and getattr(config, f) not in stored]
        says = f" ({', '.join(fields)})" if fields else ""
        raise ShapeMismatchError(f"{folder.folder}: tensor {key!r} is stored with shape {list(stored)}, but "
                                 f"config.json{says} makes it {list(expected)}: the config does not describe these "
                                 "weights (edited, or from another checkpoint)")


class FolderStore:
    """Parameters read on demand from a checkpoint folder's shards (nothing is loaded up front)."""

    def __init__(self, folder: ShardFolder, keys: Mapping[str, str]):
        self.folder = folder
        self.keys = dict(keys)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def has(self, name: str) -> bool:
        return name in self.keys

    def key(self, name: str) -> str:
        try:
            return self.keys[name]
        except KeyError:
            raise FoldError(f"{name} is not in the checkpoint {self.folder.folder} (its safetensors keys do not "
                            "match the model's parameter names); bake it with the Python API bake(), which "
                            "loads the model with transformers") from None

    def dtype(self, name: str) -> torch.dtype:
        return self.folder.info(self.key(name)).dtype

    def read(self, name: str) -> torch.Tensor:
        return self.folder.get(self.key(name))
