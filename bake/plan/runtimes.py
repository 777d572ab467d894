"""Which serving runtimes load a bake's export without custom code, and why.

For each :class:`Runtime` the planner records a :class:`RuntimeVerdict` in the fold plan
(:attr:`bake.core.plan_types.FoldPlan.runtimes`): ``--dry-run`` prints it, the model card carries it,
``--require-runtime`` (and ``--format gguf``, which needs llama.cpp) refuses a plan whose verdict
is not "yes", before any work.

The reasons are facts, each with where it comes from:

* transformers: the export is a standard ``<Model>ForCausalLM`` whose bias flags are transformers'
  own config keys, unless affine modules ship as remote code. Tested by every bake (the export is
  reloaded with transformers and compared with the hooked model).
* ONNX Runtime: the graph is traced from the baked transformers model, so folded biases and affine
  modules alike become ordinary graph ops; optimum-onnx 0.1.0 exports the registry model types whose entry
  does not say ``"onnx_export": false`` (``TasksManager.get_supported_tasks_for_model_type``:
  text-generation-with-past; ``tests/test_runtimes.py`` holds every entry to it, both ways: Mixtral,
  Qwen2-MoE and OLMoE are not exported). Tested by ``--format onnx``.
* llama.cpp, vLLM, MLX, TGI: per architecture, the runtime's name for it and the bias flags whose
  biases it loads and applies, read from its source and cited in the registry
  (``runtimes`` in ``bake/registry/archs/<model_type>.json``). llama.cpp's are also tested here: ``--format
  gguf`` checks the file in llama.cpp, and ``tests/test_gguf.py`` converts every registry
  architecture with its bias flags on. vLLM's and MLX's are tested by ``--check-runtime vllm,mlx``
  (greedy text from text prompts in the runtime's own environment). TGI's are read from source only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from bake.registry.llm import ArchEntry, Runtime, load_registry
from lineas import config_compat


class Serves(str, Enum):
    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"  # nothing recorded for this architecture: not claimed either way


class Evidence(str, Enum):
    TESTED = "tested here"
    SOURCE = "read from source"


# Which runtimes' facts the test suite runs (TGI's are read from its source only): llama.cpp by --format gguf,
# vLLM and MLX by --check-runtime (each in its own environment, from text prompts; tests/test_serving.py).
TESTED = frozenset({Runtime.TRANSFORMERS, Runtime.ONNX_RUNTIME, Runtime.LLAMA_CPP, Runtime.VLLM, Runtime.MLX})


@dataclass(frozen=True)
class RuntimeVerdict:
    runtime: Runtime
    serves: Serves
    evidence: Evidence
    reason: str
    source: str = ""

    def to_dict(self) -> dict:
        return {"runtime": self.runtime.value, "serves": self.serves.value, "evidence": self.evidence.value,
                "reason": self.reason, "source": self.source}


def parse_runtime(name: str) -> Runtime:
    """``--require-runtime`` value -> :class:`Runtime` (a few spellings accepted)."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"llamacpp": Runtime.LLAMA_CPP, "llama-cpp": Runtime.LLAMA_CPP, "gguf": Runtime.LLAMA_CPP,
               "ort": Runtime.ONNX_RUNTIME, "onnx": Runtime.ONNX_RUNTIME, "onnx-runtime": Runtime.ONNX_RUNTIME,
               "text-generation-inference": Runtime.TGI, "hf": Runtime.TRANSFORMERS}
    if key in aliases:
        return aliases[key]
    try:
        return Runtime(key)
    except ValueError:
        raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(r.value for r in Runtime)}") from None


def _evidence(runtime: Runtime) -> Evidence:
    return Evidence.TESTED if runtime in TESTED else Evidence.SOURCE


def _switched_flags(config_changes, entry: ArchEntry | None) -> list[str]:
    """Bias flags the plan switches on (config keys the registry lists as bias flags)."""
    flags = set(entry.bias_flags) if entry is not None else set()
    return [c.key for c in config_changes if c.key in flags and c.new is True]


ONNX_TRANSFORMERS_MAX = "4.58"  # optimum-onnx 0.1.0 (the newest) requires transformers < 4.58


def onnx_stack_conflict() -> str | None:
    """Why the ONNX exporter cannot run next to the installed transformers, or None.

    optimum-onnx pins transformers < 4.58; installing the ``onnx`` extra into a transformers 5
    environment would make pip downgrade transformers (and huggingface_hub below 1.0).  So the
    conflict is named here, at use time, and the fix is a separate environment, not that install."""
    if config_compat.transformers_major() < 5:
        return None
    return (f"ONNX export needs optimum-onnx 0.1.0, which requires transformers < {ONNX_TRANSFORMERS_MAX}, but this "
            f"environment has transformers {config_compat.transformers_version()}. Installing the onnx extra here "
            "would downgrade transformers and huggingface_hub. Use --format hf in this environment; for ONNX, bake in "
            "a separate one: python -m venv onnx-env && onnx-env/bin/pip install 'lineas-bake[onnx]'")


def _onnx_environment_note() -> str:
    """Where --format onnx runs: optimum-onnx 0.1.0 needs transformers < 4.58 (:func:`onnx_stack_conflict`)."""
    return " (in a transformers < 4.58 environment with the onnx extra, not this one)" if onnx_stack_conflict() else ""


def runtime_matrix(*, model_type: str | None, registry: str | None, affine_sites: tuple[str, ...],
                   config_changes, vision_language: bool = False) -> tuple[RuntimeVerdict, ...]:
    """The verdict of every :class:`Runtime` for a plan (called by :func:`bake.plan.planner.plan`);
    ``vision_language``: the registry's facts describe the model's text architecture only, so no runtime but
    transformers is claimed either way."""
    entry = load_registry().get(registry) if registry else None
    flags = _switched_flags(config_changes, entry)
    flags_text = ", ".join(f"{f}=True" for f in flags)
    affine = (f"{len(affine_sites)} affine module(s) (LineasAffine, shipped as modeling_lineas.py remote code): "
              + ", ".join(affine_sites[:4]) + (", ..." if len(affine_sites) > 4 else "")) if affine_sites else ""
    out = []
    if affine:
        out.append(RuntimeVerdict(Runtime.TRANSFORMERS, Serves.NO, Evidence.TESTED,
                                  f"only with trust_remote_code=True: {affine}"))
    else:
        out.append(RuntimeVerdict(Runtime.TRANSFORMERS, Serves.YES, Evidence.TESTED,
                                  "standard model class" + (f" with {flags_text} (transformers' own config flags)"
                                                            if flags else "") + "; the export is reloaded and checked"))
    if vision_language:
        why = (f"not recorded: {model_type!r} is a vision-language model, and registry entry {registry!r} describes "
               "its text architecture only")
        return tuple(out) + tuple(RuntimeVerdict(r, Serves.UNKNOWN, _evidence(r), why) for r in (
            Runtime.ONNX_RUNTIME, Runtime.LLAMA_CPP, Runtime.VLLM, Runtime.MLX, Runtime.TGI))
    if entry is not None and not entry.onnx_export:
        out.append(RuntimeVerdict(Runtime.ONNX_RUNTIME, Serves.NO, Evidence.TESTED,
                                  f"optimum-onnx 0.1.0 has no ONNX export config for model type {model_type!r} "
                                  "(TasksManager.get_supported_tasks_for_model_type), so --format onnx cannot "
                                  "export it"))
    elif entry is not None:  # optimum-onnx 0.1.0 exports the type (TasksManager, text-generation-with-past)
        out.append(RuntimeVerdict(Runtime.ONNX_RUNTIME, Serves.YES, Evidence.TESTED,
                                  "the graph is traced from the baked model" + (
                                      ": affine modules become ordinary graph ops" if affine else "")
                                  + "; --format onnx exports it with Optimum and checks it in ONNX Runtime"
                                  + _onnx_environment_note()))
    else:
        out.append(RuntimeVerdict(Runtime.ONNX_RUNTIME, Serves.UNKNOWN, Evidence.TESTED,
                                  f"no registry entry for model type {model_type!r}: --format onnx finds out "
                                  "whether Optimum exports it (and refuses before writing anything)"))
    for runtime in (Runtime.LLAMA_CPP, Runtime.VLLM, Runtime.MLX, Runtime.TGI):
        fact = entry.runtimes.get(runtime) if entry is not None else None
        if affine:
            out.append(RuntimeVerdict(runtime, Serves.NO, _evidence(runtime), f"needs custom code: {affine}"))
        elif fact is None:
            what = f"registry entry {registry!r}" if entry is not None else "a registry entry for this model"
            out.append(RuntimeVerdict(runtime, Serves.UNKNOWN, _evidence(runtime),
                                      f"not recorded: {what} has no {runtime.value} fact"))
        else:
            missing = [f for f in flags if f not in fact.bias_flags_served]
            if missing:
                out.append(RuntimeVerdict(runtime, Serves.NO, _evidence(runtime),
                                          f"its {fact.architecture} does not serve {', '.join(missing)}: the folded "
                                          "biases would be dropped or refused", fact.source))
            else:
                served = f" with {flags_text}" if flags else ""
                out.append(RuntimeVerdict(runtime, Serves.YES, _evidence(runtime),
                                          f"its {fact.architecture}{served}", fact.source))
    return tuple(out)


# The verification rows that run an export in a runtime, by the prefix of their tolerance row's name
# (bake.verify.tolerances): the card says which runtimes this export was checked in.
ROW_RUNTIMES = (("reload-", Runtime.TRANSFORMERS), ("onnx-", Runtime.ONNX_RUNTIME), ("gguf-", Runtime.LLAMA_CPP),
                ("vllm-", Runtime.VLLM), ("mlx-", Runtime.MLX))


def checked_on_export(checks) -> dict[str, str]:
    """``runtime name -> "passed" | "failed"`` for every runtime an export's checks ran (a failed advisory row
    is "passed with warnings"); ``checks``: the verification report's :class:`bake.verify.report.CheckResult` rows."""
    out: dict[str, list] = {}
    for c in checks:
        runtime = next((r for prefix, r in ROW_RUNTIMES if c.tolerance.name.startswith(prefix)), None)
        if runtime is not None:
            out.setdefault(runtime.value, []).append(c)
    return {name: ("failed" if any(c.failures and c.gating for c in rows) else
                   "passed with warnings" if any(c.failures for c in rows) else "passed")
            for name, rows in out.items()}


def matrix_markdown(verdicts: list[dict], checked: dict[str, str] | None = None) -> str:
    """The model card's table, from the plan's JSON form (``FoldPlan.to_dict()["runtimes"]``) and what this
    export's own checks ran (:func:`checked_on_export`)."""
    checked = checked or {}
    lines = ["| runtime | loads without custom code | checked on this export | evidence | why | source |",
             "|---|---|---|---|---|---|"]
    for v in verdicts:
        cells = [v["runtime"], v["serves"], checked.get(v["runtime"], "no"), v["evidence"], v["reason"],
                 v["source"] or "—"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def refusals(verdicts, required) -> list[RuntimeVerdict]:
    """The verdicts of ``required`` runtimes that are not "yes"."""
    want = set(required)
    return [v for v in verdicts if v.runtime in want and v.serves is not Serves.YES]


def check_required(plan, required) -> None:
    """Raise :class:`bake.errors.FoldError` (exit 2) when a runtime in ``required`` cannot serve ``plan``;
    affine sites are named, with the way out (``lineas-train --foldable``)."""
    from bake.errors import FoldError

    bad = refusals(plan.runtimes, required)
    if not bad:
        return
    lines = [f"  {v.runtime.value}: {v.serves.value}: {v.reason}" + (f" [{v.source}]" if v.source else "")
             for v in bad]
    names = " ".join(f"--require-runtime {v.runtime.value}" for v in bad)
    fix = (f"\nlearn maps that this runtime serves with `lineas-train {names}` (it freezes the shifts whose fold "
           "needs a bias flag the runtime does not load), or steer other sites")
    if plan.affine_sites:
        reasons = {p.site: p.reason for p in plan.sites if p.affine is not None}
        fix = ("\nsites that need an affine module:\n" + "\n".join(f"  {s}: {r}" for s, r in reasons.items())
               + "\nlearn maps that fold into standard weights with `lineas-train --foldable` (already the default, "
               f"auto, for models with a registry entry; it freezes the scale or shift of each such site; add {names} "
               "for bias flags the runtime does not load), or steer other sites")
    names = ", ".join(v.runtime.value for v in bad)
    raise FoldError(f"the export cannot be served by {names} without custom code, nothing was done:\n"
                    + "\n".join(lines) + fix)
