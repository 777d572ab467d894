"""The language model inside a vision-language model (Gemma-3, Qwen2.5-VL, LLaVA, Mistral-3, Idefics3, ...),
and the registry entry that plans its sites.

A VLM (``AutoModelForImageTextToText``) holds a vision tower, a projector and a text decoder; the decoder is
the same stack of layers as the text model's own causal LM, under another prefix (``model.language_model``,
``model.text_model``; it differs between transformers majors and per model).  The prefix is read from the
model, never from a table: the decoder is the submodule built from ``config.get_text_config()`` that holds
the decoder layers (:func:`text_decoder`).  The entry is the text model's own (``text_config.model_type``,
or an entry listing it under ``text_model_types``), its templates re-rooted from the causal LM's base-model
prefix to the decoder's (:func:`vlm_entry`); the vision tower and the projector have no entry, so a map on
them is planned by module type, and nothing else of theirs is written.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from bake.registry.llm import ArchEntry, NormEntry, load_registry, match_template


def text_decoder(model: nn.Module) -> str | None:
    """The module name of a vision-language model's text decoder, or None when ``model`` is not one (its config
    nests no ``vision_config``/text config, or no single submodule built from the text config holds layers)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "vision_config", None) is None or not hasattr(config, "get_text_config"):
        return None
    text = config.get_text_config()
    if text is config:
        return None
    hits = [name for name, m in model.named_modules()
            if name and getattr(m, "config", None) is text and isinstance(getattr(m, "layers", None), nn.ModuleList)]
    return hits[0] if len(hits) == 1 else None


def text_entry(text_config) -> ArchEntry | None:
    """The registry entry describing a VLM's text decoder: its model_type's, else the one listing it."""
    model_type = getattr(text_config, "model_type", None)
    registry = load_registry()
    if model_type in registry:
        return registry[model_type]
    return next((e for e in registry.values() if model_type in e.text_model_types), None)


def _base_prefix(entry: ArchEntry) -> str:
    """Where the entry's causal LM holds its decoder: what precedes ``.layers.{layer}`` in its templates
    ("model"; the class's ``base_model_prefix`` is not it for every class and major)."""
    marker = ".layers.{layer}"
    found = [t.split(marker)[0] for t in (n.site for n in entry.norms) if marker in t]
    return max(set(found), key=found.count) if found else "model"


def vlm_entry(model: nn.Module) -> tuple[ArchEntry, str] | None:
    """The registry entry that plans ``model``'s language model, its templates re-rooted under the text decoder
    (``model.layers.{layer}.input_layernorm`` -> ``model.language_model.layers.{layer}.input_layernorm``;
    ``lm_head`` stays), with ``type(model)`` as its one architecture; and the decoder's module name.  None when
    ``model`` is not a vision-language model or its text model has no entry."""
    decoder = text_decoder(model)
    if decoder is None:
        return None
    text_config = model.config.get_text_config()
    entry = text_entry(text_config)
    if entry is None:
        return None
    base = _base_prefix(entry)

    def move(template: str) -> str:
        return decoder + template[len(base):] if template.startswith(base + ".") else template

    renamed = entry.text_model_types.get(getattr(text_config, "model_type", ""), {})
    modules = dict(model.named_modules())
    norms = tuple(_norm(n, move, renamed, modules) for n in entry.norms)
    producers = tuple(replace(p, site=move(p.site)) for p in entry.producers)
    flags = {flag: tuple(move(t) for t in templates) for flag, templates in entry.bias_flags.items()}
    # The runtimes' facts are about the text architecture, not about this model: none is claimed for it.
    return replace(entry, architectures=(type(model).__name__,), norms=norms, producers=producers,
                   bias_flags=flags, runtimes={}, text_model_types={}), decoder


def _norm(norm: NormEntry, move, renamed, modules) -> NormEntry:
    """``norm`` re-rooted; its class becomes the decoder's where the entry names that class as the same
    convention under another name (``text_model_types``)."""
    site = move(norm.site)
    alias = renamed.get(norm.module_class)
    if alias is not None and any(type(m).__name__ == alias for name, m in modules.items()
                                 if match_template(site, name) is not False):
        return replace(norm, site=site, consumers=tuple(move(c) for c in norm.consumers), module_class=alias)
    return replace(norm, site=site, consumers=tuple(move(c) for c in norm.consumers))
