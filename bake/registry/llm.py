"""Fold-sites registry: per-architecture data in ``bake/registry/archs/<model_type>.json``.

Each file says, for one ``config.model_type``, which model classes it
describes (``architectures``), which modules are norms (their class and weight
convention), which linears consume each norm's output (``tensor_consumers``: which
tensors, for a MoE router or fused 3-D experts that are no linear), which linears are
producers (and their weight layout), which config flags switch biases on,
(``runtimes``) what llama.cpp, vLLM, TGI and MLX make of those flags, cited from their source,
and (``onnx_export``, default true) whether optimum-onnx 0.1.0 exports the model type.
Module names are templates with a ``{layer}`` placeholder.  Every field drives
:mod:`bake.plan.planner` (a norm's ``note``, allowed only with an empty consumer list, is the reason
its plan gives for a shift with no bias to fold into); whatever the model itself tells exactly
(biases present, weights tied) is read from the model, not written here.  Free-text remarks on an
entry live in ``docs/reference/registry.md``, not in the data.

The data is validated strictly on load (an unknown key is an error): a typo in
a registry file must not silently turn a fold off -- or on.  Where an entry
and the model disagree (another class at a norm site, another layout at a
producer, a model class the entry does not list), the planner does not use
that part of the entry and says so in the plan's notes.

A model without an entry is still baked: :mod:`bake.plan.planner` falls back to folds
that the module type alone makes exact, and to affine modules elsewhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from importlib import resources

from bake.core.plan_types import NORM_KINDS, Layout, SiteKind
from bake.errors import BakeError
from lineas.provenance import base_model_type

PRODUCER_LAYOUTS = (Layout.LINEAR, Layout.CONV1D)

_TOP_KEYS = {"model_type": str, "architectures": list, "norms": list, "producers": list,
             "bias_flags": dict, "runtimes": dict, "text_model_types": dict, "onnx_export": bool}
_REQUIRED_TOP = {"model_type", "architectures", "norms", "producers", "bias_flags"}
_NORM_KEYS = {"site": str, "kind": str, "module_class": str, "consumers": list, "note": str,
              "tensor_consumers": list}
# A consumer that is no nn.Linear (a router, fused 3-D experts): the weight it reads the norm's output with, the bias
# that takes W t, and the weight's layout (bake.core.fold_math: linear [out, in], experts [E, in, out] / [E, out, in]).
_TENSOR_CONSUMER_KEYS = {"weight": str, "bias": str, "layout": str}
TENSOR_CONSUMER_LAYOUTS = (Layout.LINEAR, Layout.EXPERTS_IN_OUT, Layout.EXPERTS_OUT_IN)
_REQUIRED_NORM = {"site", "kind", "module_class", "consumers"}
_PRODUCER_KEYS = {"site": str, "layout": str}


class Runtime(str, Enum):
    """Serving runtimes of the compatibility matrix (bake.plan.runtimes)."""

    TRANSFORMERS = "transformers"
    ONNX_RUNTIME = "onnxruntime"
    LLAMA_CPP = "llama.cpp"
    VLLM = "vllm"
    TGI = "tgi"
    MLX = "mlx"


# What a serving runtime makes of this architecture (read by bake.plan.runtimes, which the planner calls):
# its own name for it, the bias flags whose biases it loads and applies for every module the flag
# covers, and where in the runtime's source that was read. transformers and ONNX Runtime need no
# per-architecture data: the flags are transformers' own, and the ONNX graph is traced from it.
RUNTIMES_IN_REGISTRY = (Runtime.LLAMA_CPP, Runtime.VLLM, Runtime.TGI, Runtime.MLX)
_RUNTIME_KEYS = {"architecture": str, "bias_flags_served": list, "source": str}
_PLACEHOLDER = re.compile(r"\{([^}]*)\}")


class RegistryError(BakeError, ValueError):
    """A registry file is malformed."""


@dataclass(frozen=True)
class TensorConsumer:
    weight: str                     # template of the parameter that reads the norm's output
    bias: str                       # template of the parameter that takes W t
    layout: Layout                  # one of TENSOR_CONSUMER_LAYOUTS

    @property
    def module(self) -> str:
        return self.weight.rpartition(".")[0]


@dataclass(frozen=True)
class NormEntry:
    site: str                       # template
    kind: SiteKind                  # one of NORM_KINDS: fixes the weight convention (w or 1+w)
    consumers: tuple[str, ...]      # templates of the linears reading this norm's output
    module_class: str               # the class the convention was checked on; another class: entry not used
    note: str = ""                  # consumers empty: why nothing reads the output (the plan's reason for the shift)
    tensor_consumers: tuple[TensorConsumer, ...] = ()  # consumers addressed by tensor (routers, fused experts)


@dataclass(frozen=True)
class ProducerEntry:
    site: str
    layout: Layout                  # must agree with the module's type, else the entry is not used


@dataclass(frozen=True)
class RuntimeEntry:
    architecture: str                    # the runtime's name for the architecture (it serves it)
    bias_flags_served: tuple[str, ...]   # config bias flags whose biases it loads and applies
    source: str                          # file and function of the runtime's source this was read from


@dataclass(frozen=True)
class ArchEntry:
    model_type: str
    architectures: tuple[str, ...]  # model classes whose module names the templates follow
    norms: tuple[NormEntry, ...]
    producers: tuple[ProducerEntry, ...]
    bias_flags: Mapping[str, tuple[str, ...]]  # config flag -> templates of linears it gives a bias
    runtimes: Mapping[Runtime, RuntimeEntry] = field(default_factory=dict)  # one of RUNTIMES_IN_REGISTRY -> entry
    # model_type of a vision-language model's text decoder laid out like this entry -> {entry's norm class: the
    # decoder's class of the same convention}: bake.registry.vlm plans the decoder with this entry
    text_model_types: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    onnx_export: bool = True        # optimum-onnx 0.1.0 exports the type (text-generation-with-past)

    def describes(self, model) -> str | None:
        """The listed architecture ``model`` is (or derives from, e.g. a reloaded ``LineasSteeredX``),
        or None when the entry does not describe this class."""
        for cls in type(model).__mro__:
            if cls.__name__ in self.architectures:
                return cls.__name__
        return None

    def match_norm(self, site: str) -> tuple[NormEntry, str | None] | None:
        """The norm entry whose template matches ``site``, and the layer index (None if no ``{layer}``)."""
        for e in self.norms:
            layer = match_template(e.site, site)
            if layer is not False:
                return e, layer
        return None

    def match_producer(self, name: str) -> ProducerEntry | None:
        for e in self.producers:
            if match_template(e.site, name) is not False:
                return e
        return None

    def flag_for(self, module_name: str) -> str | None:
        """The config flag that gives ``module_name`` a bias, if any."""
        for flag, templates in self.bias_flags.items():
            if any(match_template(t, module_name) is not False for t in templates):
                return flag
        return None


def expand(template: str, layer: str | None) -> str:
    return template if layer is None else template.replace("{layer}", layer)


def _template_regex(template: str) -> re.Pattern:
    parts = template.split("{layer}")
    return re.compile(r"(\d+)".join(re.escape(p) for p in parts) + r"\Z")


def match_template(template: str, name: str) -> str | None | bool:
    """Layer index string if ``name`` matches ``template``; None if it matches a template without
    ``{layer}``; False if it does not match."""
    if "{layer}" not in template:
        return None if template == name else False
    m = _template_regex(template).match(name)
    if not m:
        return False
    layers = set(m.groups())
    return layers.pop() if len(layers) == 1 else False


# -- validation ---------------------------------------------------------------
def check_keys(obj: object, allowed: Mapping[str, type], required: set, where: str) -> None:
    if not isinstance(obj, dict):
        raise RegistryError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise RegistryError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(obj))
    if missing:
        raise RegistryError(f"{where}: missing key(s) {missing}")
    for k, typ in allowed.items():
        if k in obj and not isinstance(obj[k], typ):
            raise RegistryError(f"{where}: {k!r} must be {typ.__name__}, got {type(obj[k]).__name__}")


def check_note(norm: Mapping, where: str) -> None:
    """A norm's ``note`` is the reason the plan gives for a shift nothing can take, so it needs an empty
    ``consumers`` list: elsewhere nothing would read it."""
    if norm.get("note") is not None and (norm["consumers"] or norm.get("tensor_consumers")):
        raise RegistryError(f"{where}: 'note' says why no linear reads the norm's output, so it is allowed only with "
                            "an empty 'consumers' list")


def _check_template(t: object, where: str) -> str:
    if not isinstance(t, str) or not t:
        raise RegistryError(f"{where}: module template must be a non-empty string, got {t!r}")
    bad = [p for p in _PLACEHOLDER.findall(t) if p != "layer"]
    if bad:
        raise RegistryError(f"{where}: template {t!r} has unknown placeholder(s) {bad}; only {{layer}} is allowed")
    return t


def _str_list(obj: object, where: str) -> tuple[str, ...]:
    if not isinstance(obj, list):
        raise RegistryError(f"{where}: expected a list, got {type(obj).__name__}")
    return tuple(_check_template(t, f"{where}[{i}]") for i, t in enumerate(obj))


def parse_entry(data: object, origin: str = "<registry>") -> ArchEntry:
    """Validate one registry document and build its :class:`ArchEntry`."""
    check_keys(data, _TOP_KEYS, _REQUIRED_TOP, origin)
    assert isinstance(data, dict)
    norms = []
    for i, n in enumerate(data["norms"]):
        where = f"{origin}: norms[{i}]"
        check_keys(n, _NORM_KEYS, _REQUIRED_NORM, where)
        if n["kind"] not in NORM_KINDS:
            raise RegistryError(f"{where}: kind {n['kind']!r} is not one of {[k.value for k in NORM_KINDS]}")
        if not n["module_class"]:
            raise RegistryError(f"{where}: 'module_class' must name the norm's class")
        check_note(n, where)
        norms.append(NormEntry(site=_check_template(n["site"], where), kind=SiteKind(n["kind"]),
                               consumers=_str_list(n["consumers"], where + ".consumers"),
                               module_class=n["module_class"], note=n.get("note", ""),
                               tensor_consumers=_tensor_consumers(n.get("tensor_consumers", []), where)))
    producers = []
    for i, p in enumerate(data["producers"]):
        where = f"{origin}: producers[{i}]"
        check_keys(p, _PRODUCER_KEYS, set(_PRODUCER_KEYS), where)
        if p["layout"] not in PRODUCER_LAYOUTS:
            raise RegistryError(f"{where}: layout {p['layout']!r} is not one of {[x.value for x in PRODUCER_LAYOUTS]}")
        producers.append(ProducerEntry(site=_check_template(p["site"], where), layout=Layout(p["layout"])))
    producer_sites = {p.site for p in producers}
    flags = {}
    for flag, templates in data["bias_flags"].items():
        flags[flag] = _str_list(templates, f"{origin}: bias_flags[{flag!r}]")
    # Every linear the registry talks about must be declared a producer, so its layout is known.
    for where, names in ([(f"norm {n.site!r} consumers", n.consumers) for n in norms]
                         + [(f"bias flag {f!r}", t) for f, t in flags.items()]):
        unknown = [t for t in names if t not in producer_sites]
        if unknown:
            raise RegistryError(f"{origin}: {where} name(s) {unknown} not listed under 'producers'")
    runtimes = _parse_runtimes(data.get("runtimes", {}), flags, origin)
    archs = data["architectures"]
    if not archs or not all(isinstance(a, str) and a for a in archs):
        raise RegistryError(f"{origin}: 'architectures' must be a non-empty list of class names")
    text_types = data.get("text_model_types", {})
    if not all(isinstance(t, str) and t and isinstance(r, dict) and all(isinstance(x, str) and x for kv in r.items()
                                                                       for x in kv) for t, r in text_types.items()):
        raise RegistryError(f"{origin}: 'text_model_types' must map model_type names to {{norm class: class}}")
    return ArchEntry(model_type=data["model_type"], architectures=tuple(archs), norms=tuple(norms),
                     producers=tuple(producers), bias_flags=flags, runtimes=runtimes, text_model_types=text_types,
                     onnx_export=data.get("onnx_export", True))


def _tensor_consumers(data: list, where: str) -> tuple[TensorConsumer, ...]:
    out = []
    for i, c in enumerate(data):
        w = f"{where}.tensor_consumers[{i}]"
        check_keys(c, _TENSOR_CONSUMER_KEYS, set(_TENSOR_CONSUMER_KEYS), w)
        if c["layout"] not in TENSOR_CONSUMER_LAYOUTS:
            allowed = [x.value for x in TENSOR_CONSUMER_LAYOUTS]
            raise RegistryError(f"{w}: layout {c['layout']!r} is not one of {allowed}")
        weight, bias = _check_template(c["weight"], w), _check_template(c["bias"], w)
        if weight.rpartition(".")[0] != bias.rpartition(".")[0]:
            raise RegistryError(f"{w}: weight {weight!r} and bias {bias!r} must belong to one module")
        out.append(TensorConsumer(weight=weight, bias=bias, layout=Layout(c["layout"])))
    return tuple(out)


def _parse_runtimes(data: dict, flags: Mapping[str, tuple[str, ...]], origin: str) -> dict[Runtime, RuntimeEntry]:
    out = {}
    allowed = {r.value: r for r in RUNTIMES_IN_REGISTRY}
    for name, r in data.items():
        where = f"{origin}: runtimes[{name!r}]"
        if name not in allowed:
            raise RegistryError(f"{where}: unknown runtime; allowed: {list(allowed)}")
        check_keys(r, _RUNTIME_KEYS, set(_RUNTIME_KEYS), where)
        served = r["bias_flags_served"]
        unknown = [f for f in served if f not in flags]
        if unknown:
            raise RegistryError(f"{where}: bias_flags_served names {unknown}, not among this entry's bias_flags "
                                f"{sorted(flags)}")
        if not r["architecture"] or not r["source"].strip():
            raise RegistryError(f"{where}: 'architecture' and 'source' must be non-empty (cite the runtime's source)")
        out[allowed[name]] = RuntimeEntry(architecture=r["architecture"], bias_flags_served=tuple(served),
                                          source=r["source"])
    return out


@cache
def load_registry() -> Mapping[str, ArchEntry]:
    """All shipped entries, keyed by ``model_type`` (each file is validated)."""
    out: dict[str, ArchEntry] = {}
    for f in sorted(resources.files("bake.registry").joinpath("archs").iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".json"):
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RegistryError(f"archs/{f.name}: not valid JSON ({e})") from None
        entry = parse_entry(data, f"archs/{f.name}")
        if f.name != entry.model_type + ".json":
            raise RegistryError(f"archs/{f.name}: model_type {entry.model_type!r} does not match the file name")
        out[entry.model_type] = entry
    return out


def entry_for(config) -> ArchEntry | None:
    """The registry entry for a transformers config (by ``model_type``), or None when there is none."""
    model_type = base_model_type(config)  # an export with affine modules ("lineas_<base>"): its base's entry
    return load_registry().get(model_type) if model_type else None
