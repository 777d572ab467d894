"""Checkpoint keys as transformers names them: at load (key -> parameter name) and at save (name -> key).

The out-of-core bake reads and writes safetensors keys itself, so it must rename them exactly as
``from_pretrained`` and ``save_pretrained`` do, with transformers' own objects (no table of ours):

* transformers 5 renames (and for MoE checkpoints fuses) keys at load through its conversion mapping:
  ``transformers.conversion_mapping.get_model_conversion_mapping`` gives the model's ``WeightRenaming`` and
  ``WeightConverter`` objects, ``transformers.core_model_loading.rename_source_key`` applies them and adds or
  strips ``base_model_prefix`` (as ``convert_and_load_state_dict_in_model`` does); ``save_pretrained`` writes
  the reversed transforms (``revert_weight_conversion``).  A GPT-NeoX checkpoint stores ``embed_out.weight``,
  which loads into ``lm_head.weight`` and is saved back as ``embed_out.weight``.
* transformers 4 renames at load with ``PreTrainedModel._get_key_renaming_mapping`` (legacy ``gamma``/``beta``
  names, the ``_checkpoint_conversion_mapping`` of the classes listed in ``modeling_utils.VLMS``, a missing or
  extra ``base_model_prefix``); ``save_pretrained`` reverses the VLM mapping only.

A key that a ``WeightConverter`` would transform (experts stored one per module, fused at load into one
tensor) has no single tensor to read or fold: :class:`ConvertedCheckpointError` refuses it by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from bake.errors import BakeError


class ConvertedCheckpointError(BakeError, ValueError):
    """Checkpoint keys that transformers converts at load (fuses several stored tensors into one parameter,
    splits one, or transforms its values), which the out-of-core bake cannot read as stored tensors."""


def _refuse(model: nn.Module, keys: list[str], what: str) -> ConvertedCheckpointError:
    import transformers

    return ConvertedCheckpointError(
        f"transformers {transformers.__version__} {what} {len(keys)} tensor(s) of this {type(model).__name__} "
        f"checkpoint through a WeightConverter of its conversion mapping (e.g. {keys[0]!r}): a fused or "
        "converted tensor is not a stored tensor, and the out-of-core bake reads and writes stored tensors only; "
        "bake it with the Python API bake(), which loads the model with transformers")


def _v5_transforms(model: nn.Module, *, add_legacy: bool):
    """(renamings, converters) of transformers 5's conversion mapping for ``model``, or None under 4.x."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model, add_legacy=add_legacy)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def loaded_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> the name of the parameter or buffer of ``model`` that ``from_pretrained`` loads it
    into (a key transformers would drop is left out; one it would not match maps to its renamed name all the
    same).  Raises :class:`ConvertedCheckpointError` for keys a ``WeightConverter`` transforms."""
    keys = list(keys)
    transforms = _v5_transforms(model, add_legacy=True)
    if transforms is None:
        return _v4_loaded_names(model, keys)
    from transformers.core_model_loading import rename_source_key

    renamings, converters = transforms
    prefix = model.base_model_prefix
    expected = model.state_dict()  # on the meta device: names and shapes only
    out: dict[str, str] = {}
    converted: list[str] = []
    for key in keys:  # as transformers.core_model_loading.convert_and_load_state_dict_in_model does
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=expected)
        if pattern is not None:
            converted.append(key)
        out[key] = name
    if converted:
        raise _refuse(model, converted, "converts")
    return out


def _vlm_mapping(model: nn.Module) -> dict[str, str] | None:
    """transformers 4's ``_checkpoint_conversion_mapping``, where ``from_pretrained`` applies it (VLM classes)."""
    try:
        from transformers.modeling_utils import VLMS
    except ImportError:
        return None
    if any(v in c.__name__.lower() for c in type(model).__mro__[:-1] for v in VLMS):
        return dict(getattr(model, "_checkpoint_conversion_mapping", None) or {}) or None
    return None


def _v4_loaded_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """As transformers 4.x ``PreTrainedModel._load_pretrained_model`` computes its key renaming."""
    prefix = model.base_model_prefix
    has_prefix = bool(prefix) and any(k.startswith(prefix) for k in keys)
    expects_prefix = bool(prefix) and hasattr(model, prefix)
    rename = getattr(model, "_get_key_renaming_mapping", None)
    if rename is None:  # not a transformers model: keys are names
        return {k: k for k in keys}
    return rename(keys, _vlm_mapping(model), has_prefix and not expects_prefix, expects_prefix and not has_prefix)


class SavedNames:
    """Parameter name of ``model`` -> the key ``save_pretrained`` writes it under, as transformers' own
    save path computes it (5.x: the reversed conversion mapping; 4.x: the reversed VLM mapping)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._v5 = None
        transforms = _v5_transforms(model, add_legacy=False)
        if transforms is not None:  # as transformers.core_model_loading.revert_weight_conversion
            from transformers.core_model_loading import PrefixChange, WeightRenaming

            renamings, converters = transforms
            conversions = getattr(model, "_weight_conversions", None)
            if conversions is None:
                conversions = [t for t in renamings + converters if not isinstance(t, PrefixChange)]
            reverse = [t.reverse_transform() for t in conversions[::-1]]
            self._v5 = ([t for t in reverse if isinstance(t, WeightRenaming)],
                        [t for t in reverse if not isinstance(t, WeightRenaming)])
        self._vlm = _vlm_mapping(model)

    def __call__(self, name: str) -> str:
        if self._v5 is not None:
            from transformers.core_model_loading import apply_converters, apply_renamings

            renamings, converters = self._v5
            _, pattern = apply_converters(name, converters)
            if pattern is not None:
                raise _refuse(self.model, [name], "would save")
            return apply_renamings(name, renamings)
        key = name
        if self._vlm:  # transformers 4.x PreTrainedModel.save_pretrained, for VLM classes
            for pattern, replacement in {v: k for k, v in self._vlm.items()}.items():
                replacement = re.sub(r"\(.*\)", "", replacement.lstrip("^"))
                key, n = re.subn(pattern, replacement, key)
                if n:
                    break
        return key

