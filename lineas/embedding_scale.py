"""One meaning for a scaled token-embedding site on every transformers version.

Gemma (1, 2 and 3) multiplies its token embeddings by ``sqrt(hidden_size)`` before the first decoder
layer.  Where that factor lives depends on the version:

* transformers 5 (all three) and 4.x Gemma-3: inside the embedding module
  (``*TextScaledWordEmbedding``, an ``nn.Embedding`` subclass with an ``embed_scale``), so the module's
  output is the scaled embedding;
* transformers 4.x Gemma and Gemma-2: in the model's ``forward``, after a plain ``nn.Embedding``, so the
  module's output is the unscaled table row.

**The site ``model.embed_tokens`` means the scaled embedding** -- what the decoder layers receive, and
what the module outputs on transformers 5.  A map ``T(y) = scale*y + shift`` learned at that site on 4.x
or on 5.x is the same map, and bakes into the same table.  Where the module's output is the unscaled row
(4.x Gemma/Gemma-2), the site's activation is ``c * output`` with ``c = sqrt(hidden_size)``
(:func:`outside_scale`): the hooks apply ``scale*y + shift/c`` to the module output, the learners record
``c * output``, and the baker folds ``shift/c``.  A scaled embedding module multiplies its table by ``k``
(:func:`table_scale`), so folding ``T`` into its table is ``E' = scale*E + shift/k``.  Either way the
baked table is ``scale*E + shift/sqrt(hidden_size)``.

Maps learned for a Gemma/Gemma-2 ``embed_tokens`` site by lineas-bake 0.1.0 under transformers 4.x (before
this rule) had the unscaled meaning: their shift is ``sqrt(hidden_size)`` times too small under this one.
"""

from __future__ import annotations

import torch
from torch import nn

from lineas.provenance import base_model_type

# model_type -> transformers 4.x applies sqrt(hidden_size) after a plain nn.Embedding, in the model's forward.
SCALED_OUTSIDE_THE_MODULE = frozenset({"gemma", "gemma2"})


def is_scaled_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` subclass whose forward is ``embedding(ids) * embed_scale`` (transformers'
    ``*ScaledWordEmbedding``)."""
    return (isinstance(module, nn.Embedding) and type(module).__name__.endswith("ScaledWordEmbedding")
            and hasattr(module, "embed_scale"))


def table_scale(module: nn.Module) -> float:
    """``k``: the factor a scaled embedding module applies to its table rows (1.0 for a plain embedding)."""
    if not is_scaled_embedding(module):
        return 1.0
    scalar = getattr(module, "scalar_embed_scale", None)  # transformers 5 keeps the float too
    if scalar is not None:
        return float(scalar)
    buf = module.embed_scale
    if isinstance(buf, torch.Tensor) and buf.device.type == "meta":
        raise ValueError(f"{type(module).__name__}.embed_scale is on the meta device: its value is unknown")
    return float(buf)


def outside_scale(model: nn.Module, module: nn.Module) -> float:
    """``c``: the site's activation is ``c`` times ``module``'s output.  Not 1 only for the input embedding
    of a transformers 4.x Gemma/Gemma-2 model, whose ``sqrt(hidden_size)`` is applied after the module."""
    config = getattr(model, "config", None)
    if base_model_type(config) not in SCALED_OUTSIDE_THE_MODULE:
        return 1.0
    # A lineas affine module wrapped around the embedding (an earlier bake) outputs in the same space.
    inner = module.inner if type(module).__name__ == "LineasAffine" else module
    if type(inner) is not nn.Embedding:  # transformers 5: a *ScaledWordEmbedding carries its own factor
        return 1.0
    get = getattr(model, "get_input_embeddings", None)
    if get is None or get() is not module:
        return 1.0
    return float(config.hidden_size) ** 0.5
