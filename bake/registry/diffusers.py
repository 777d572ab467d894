"""Fold-sites registry for diffusers components: ``bake/registry/archs/diffusers/components.json``.

diffusers nests blocks (``down_blocks.1.attentions.0.transformer_blocks.0.norm1``), so entries are
keyed not by name templates (as the per-architecture LLM registry, :mod:`bake.registry.llm`) but by
*class*: a rule names a parent module class and the attribute path of the steered child
(``BasicTransformerBlock`` + ``norm3``), the child's class, and, for a bias-free norm, the linears
(paths relative to the parent) that read its output.  ``when`` restricts a rule to parents whose
attributes have one of the listed values (``norm_type``, ``pos_embed`` ...): the same class feeds
its norms to different places depending on its config.  ``adaln`` rules name an adaptive-norm class,
the attribute of its modulation Linear and the name of each row chunk (see
:func:`bake.core.fold_math.fold_adaln_rows`).  ``components`` lists the component classes the rules were
checked on; a site in another component is planned by module type only, with a note.

Validated strictly like :mod:`bake.registry.llm` (an unknown key is an error; a norm's ``note``, the reason
the plan gives for a shift nothing can take, only with an empty consumer list), and every field is read by
the planner (:mod:`bake.plan.diffusers`): the rules become an :class:`bake.registry.llm.ArchEntry` of exact
site names for the shared planner, and :class:`AdalnRule` s for the AdaLN fold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from torch import nn

from bake.core.fold_math import ADALN_SCALE, ADALN_SHIFT
from bake.core.plan_types import NORM_KINDS, Layout, SiteKind
from bake.registry.llm import RegistryError, check_keys, check_note

REGISTRY_NAME = "diffusers"
_TOP = {"family": str, "components": list, "adaln": list, "norms": list, "modulated_norms": list, "producers": list}
_ADALN = {"module_class": str, "linear": str, "chunks": list, "when": dict}
_NORM = {"parent_class": str, "attribute": str, "module_class": str, "kind": str, "consumers": list, "when": dict,
         "note": str}
_PRODUCER = {"parent_class": str, "attribute": str, "layouts": list}
_MODULATED = {"parent_class": str, "attribute": str, "module_class": str, "modulator": str, "scale": str, "shift": str}
_PRODUCER_LAYOUTS = (Layout.LINEAR, Layout.CONV)
_JSON_SCALARS = (str, bool, int, float, type(None))


def _when_holds(when: Mapping[str, tuple], module: nn.Module) -> bool:
    """Every listed attribute of ``module`` has one of the listed values (null: the attribute is None)."""
    missing = object()
    for attr, allowed in when.items():
        value = getattr(module, attr, missing)
        if value is missing:
            return False
        if value is None:
            if None not in allowed:
                return False
        elif not isinstance(value, _JSON_SCALARS) or value not in [a for a in allowed if a is not None]:
            return False
    return True


@dataclass(frozen=True)
class AdalnRule:
    module_class: str
    linear: str                    # attribute of the modulation Linear
    chunks: tuple[str, ...]        # one name per row block; "scale" and "shift" modulate output 0
    when: Mapping[str, tuple] = None

    def applies(self, module: nn.Module) -> bool:
        return type(module).__name__ == self.module_class and _when_holds(self.when or {}, module)


@dataclass(frozen=True)
class NormRule:
    parent_class: str
    attribute: str
    module_class: str
    kind: SiteKind
    consumers: tuple[str, ...]
    when: Mapping[str, tuple] = None
    note: str = ""                 # consumers empty: why nothing reads the output (the plan's reason for the shift)


@dataclass(frozen=True)
class ModulatedNormRule:
    """A weightless norm whose output its parent modulates with two row blocks (``scale``, ``shift``, names
    from the adaln rule of the parent's ``modulator`` AdaLN) before anything reads it."""

    parent_class: str
    attribute: str
    module_class: str
    modulator: str
    scale: str
    shift: str


@dataclass(frozen=True)
class ProducerRule:
    parent_class: str
    attribute: str
    layouts: tuple[Layout, ...]


@dataclass(frozen=True)
class PipelineRegistry:
    components: tuple[str, ...]
    adaln: tuple[AdalnRule, ...]
    norms: tuple[NormRule, ...]
    producers: tuple[ProducerRule, ...]
    modulated: tuple[ModulatedNormRule, ...] = ()

    def modulated_rule(self, name: str, modules: Mapping[str, nn.Module]) -> tuple[ModulatedNormRule, str] | None:
        for r in self.modulated:
            parent = _parent_name(name, r.attribute)
            if (parent is not None and type(modules.get(parent)).__name__ == r.parent_class
                    and type(modules[name]).__name__ == r.module_class):
                return r, parent
        return None

    def adaln_rule(self, module: nn.Module) -> AdalnRule | None:
        return next((r for r in self.adaln if r.applies(module)), None)

    def norm_rule(self, name: str, modules: Mapping[str, nn.Module]) -> tuple[NormRule, str] | None:
        """The rule for site ``name`` and its parent's name, when one applies."""
        for r in self.norms:
            parent = _parent_name(name, r.attribute)
            if (parent is not None and type(modules.get(parent)).__name__ == r.parent_class
                    and type(modules[name]).__name__ == r.module_class and _when_holds(r.when or {}, modules[parent])):
                return r, parent
        return None

    def producer_rule(self, name: str, modules: Mapping[str, nn.Module]) -> ProducerRule | None:
        for r in self.producers:
            parent = _parent_name(name, r.attribute)
            if parent is not None and type(modules.get(parent)).__name__ == r.parent_class:
                return r
        return None


def _parent_name(name: str, attribute: str) -> str | None:
    return name[: -len(attribute) - 1] if name.endswith("." + attribute) else None


def _when(obj: object, where: str) -> Mapping[str, tuple]:
    if not isinstance(obj, dict):
        raise RegistryError(f"{where}: 'when' must be an object")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, list) or not v or not all(isinstance(x, _JSON_SCALARS) for x in v):
            raise RegistryError(f"{where}: when[{k!r}] must be a non-empty list of JSON scalars, got {v!r}")
        out[k] = tuple(v)
    return out


def _strings(obj: list, where: str) -> tuple[str, ...]:
    if not all(isinstance(x, str) and x for x in obj):
        raise RegistryError(f"{where}: expected a list of non-empty strings, got {obj!r}")
    return tuple(obj)


def parse_pipeline_registry(data: object, origin: str = "<diffusers registry>") -> PipelineRegistry:
    check_keys(data, _TOP, {"family", "components", "adaln", "norms", "producers"}, origin)
    if data["family"] != REGISTRY_NAME:
        raise RegistryError(f"{origin}: family {data['family']!r} is not {REGISTRY_NAME!r}")
    adaln = []
    for i, a in enumerate(data["adaln"]):
        where = f"{origin}: adaln[{i}]"
        check_keys(a, _ADALN, {"module_class", "linear", "chunks"}, where)
        chunks = _strings(a["chunks"], where + ".chunks")
        if chunks.count(ADALN_SCALE) != 1 or chunks.count(ADALN_SHIFT) != 1 or len(set(chunks)) != len(chunks):
            raise RegistryError(f"{where}: chunks {list(chunks)} must be distinct names with exactly one "
                                f"{ADALN_SCALE!r} and one {ADALN_SHIFT!r}")
        adaln.append(AdalnRule(module_class=a["module_class"], linear=a["linear"], chunks=chunks,
                               when=_when(a.get("when", {}), where)))
    norms = []
    for i, n in enumerate(data["norms"]):
        where = f"{origin}: norms[{i}]"
        check_keys(n, _NORM, {"parent_class", "attribute", "module_class", "kind", "consumers"}, where)
        if n["kind"] not in NORM_KINDS:
            raise RegistryError(f"{where}: kind {n['kind']!r} is not one of {[k.value for k in NORM_KINDS]}")
        check_note(n, where)
        norms.append(NormRule(parent_class=n["parent_class"], attribute=n["attribute"],
                              module_class=n["module_class"], kind=SiteKind(n["kind"]),
                              consumers=_strings(n["consumers"], where + ".consumers"),
                              when=_when(n.get("when", {}), where), note=n.get("note", "")))
    modulated = []
    for i, n in enumerate(data.get("modulated_norms", [])):
        where = f"{origin}: modulated_norms[{i}]"
        check_keys(n, _MODULATED, set(_MODULATED), where)
        if not any(n["scale"] in a.chunks and n["shift"] in a.chunks for a in adaln):
            raise RegistryError(f"{where}: no adaln rule has chunks named {n['scale']!r} and {n['shift']!r}")
        modulated.append(ModulatedNormRule(**n))
    producers = []
    for i, p in enumerate(data["producers"]):
        where = f"{origin}: producers[{i}]"
        check_keys(p, _PRODUCER, set(_PRODUCER), where)
        bad = [x for x in p["layouts"] if x not in [lay.value for lay in _PRODUCER_LAYOUTS]]
        if bad or not p["layouts"]:
            raise RegistryError(f"{where}: layouts {p['layouts']!r} must be a non-empty list of "
                                f"{[lay.value for lay in _PRODUCER_LAYOUTS]}")
        producers.append(ProducerRule(parent_class=p["parent_class"], attribute=p["attribute"],
                                      layouts=tuple(Layout(x) for x in p["layouts"])))
    return PipelineRegistry(components=_strings(data["components"], origin + ": components"), adaln=tuple(adaln),
                            norms=tuple(norms), producers=tuple(producers), modulated=tuple(modulated))


@cache
def load_pipeline_registry() -> PipelineRegistry:
    f = resources.files("bake.registry").joinpath("archs", "diffusers", "components.json")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RegistryError(f"archs/diffusers/components.json: not valid JSON ({e})") from None
    return parse_pipeline_registry(data, "archs/diffusers/components.json")
