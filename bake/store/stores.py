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
from bake.store.key_names import loaded_names
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


def checkpoint_keys(skeleton: nn.Module, folder: ShardFolder, loaded: Mapping[str, str] | None = None
                    ) -> dict[str, str]:
    """Parameter name of ``skeleton`` -> the key that holds its value in ``folder``.

    Keys are renamed as ``from_pretrained`` renames them (:func:`bake.store.key_names.loaded_names`:
    transformers 5's conversion mapping, such as GPT-NeoX's ``embed_out`` -> ``lm_head``; a missing or extra
    ``base_model_prefix``); ``loaded``: that renaming, when already computed.  Tied parameters share one
    Parameter object in the skeleton; the checkpoint stores one of their names.
    """
    by_id: dict[int, list[str]] = {}
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    for n, p in params.items():
        by_id.setdefault(id(p), []).append(n)
    key_of: dict[str, str] = {}
    for key, name in (loaded if loaded is not None else loaded_names(skeleton, folder.keys())).items():
        key_of.setdefault(name, key)
    out: dict[str, str] = {}
    for n, p in params.items():
        cand = next((c for c in by_id[id(p)] if c in key_of), None)
        if cand is not None:
            out[n] = key_of[cand]
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
    """Parameters read on demand from a checkpoint folder's shards (nothing is loaded up front).

    ``keys``: parameter name -> checkpoint key (:func:`checkpoint_keys`); ``loaded``: checkpoint key -> the
    name transformers loads it into (:func:`bake.store.key_names.loaded_names`; default: the first name
    ``keys`` gives it).  :meth:`of` computes both."""

    def __init__(self, folder: ShardFolder, keys: Mapping[str, str], loaded: Mapping[str, str] | None = None):
        self.folder = folder
        self.keys = dict(keys)
        if loaded is None:
            loaded = {}
            for name, key in self.keys.items():
                loaded.setdefault(key, name)
        self.loaded = dict(loaded)

    @classmethod
    def of(cls, skeleton: nn.Module, folder: ShardFolder) -> FolderStore:
        """The store of ``folder`` for the model ``skeleton`` describes, keys renamed as transformers does."""
        loaded = loaded_names(skeleton, folder.keys())
        return cls(folder, checkpoint_keys(skeleton, folder, loaded), loaded)

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
