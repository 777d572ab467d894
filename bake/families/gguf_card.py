"""The card and provenance record of a GGUF file baked in place (:mod:`bake.families.gguf_inplace`)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from bake.formats.llamacpp import llama_cpp_python_version
from bake.plan.history import PROVENANCE_FILE
from bake.publish.card import VERIFICATION_FILE, package_versions
from bake.store.gguf_file import gguf_version


def _counts(bake) -> dict:
    return dict(Counter(bake.written.values()))


def gguf_provenance(bake, command: str) -> dict:
    """``lineas_provenance.json`` (sealed by :func:`bake.publish.card.seal` with every other file's sha256)."""
    report = bake.report
    return {
        "tool": "lineas-bake", "versions": {**package_versions(), "gguf": gguf_version(),
                                            "llama-cpp-python": llama_cpp_python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "base_model": {"name": bake.source.name, "path": str(bake.source),
                       "config_sha256": bake.earlier[-1]["base_config_sha256"]},
        "maps": [s.describe() for s in bake.sources],
        "strengths": [s.strength for s in bake.sources],
        "export": {"format": "gguf-inplace", "file": bake.source.name, "architecture": bake.store.architecture,
                   "file_type": bake.store.field("general.file_type"), "tensors": _counts(bake),
                   "trust_remote_code_needed": False},
        "gguf_writes": [{"tensor": n, "what": w, "new": new} for n, w, new in bake.writes],
        "verification": {"skipped": report.skipped, "passed": report.passed and not report.skipped,
                         "file": VERIFICATION_FILE, **bake.details},
        "bakes": bake.earlier,
        "plan_summary": bake.plan.summary(),
        "plan": bake.plan.to_dict(),
    }


def _quantised_rows(bake) -> str:
    checks = bake.report.checks if bake.report is not None else []
    rows = ["| check | gating | max rel | mean KL | top-1 | greedy |", "|---|---|---|---|---|---|"]
    for c in checks:
        rows.append(f"| {c.label} | {'yes' if c.gating else 'no'} | {c.max_rel:.3g} | {c.mean_kl:.3g} | "
                    f"{c.top1:.4f} | {c.greedy_matched}/{c.greedy_total} |")
    return "\n".join(rows)


def gguf_card(bake, command: str) -> str:
    name = bake.source.name
    lams = ", ".join(f"{s.strength:g}" for s in bake.sources)
    maps = "\n".join(f"- `{s.origin}` (sha256 `{s.sha256[:12]}`) at λ = {s.strength:g}" for s in bake.sources)
    counts = _counts(bake)
    if bake.report is None or bake.report.skipped:
        verdict = "**Verification was skipped (`--no-verify`)**: treat this file as unverified."
    else:
        verdict = ("The fold was checked exactly: the baked file, dequantised to F32, runs in llama.cpp like the "
                   "source file dequantised by transformers with the steering hooks (float32 tolerance, identical "
                   "greedy tokens). The quantised file itself is measured beside the unsteered source file (the "
                   "quantisation's own error): see the table.")
    return f"""---
base_model: "{name}"
library_name: gguf
tags:
- activation-steering
- lineas
- steered
- gguf
---

# {name} — steered in place with lineas-bake

This is `{name}` with per-neuron affine steering maps baked in at λ = {lams}. The quantised tensors are the
source file's, byte for byte ({counts.get('copied', 0)} copied); the steering lives in F32 tensors llama.cpp
always keeps in F32: {counts.get('folded', 0)} folded norm weights or biases and {counts.get('new', 0)} new
biases. Architecture `{bake.store.architecture}`; the metadata (tokenizer, chat template, quantisation info)
is the source's, plus a `lineas.*` record of this bake.

## What was steered

{maps}

{bake.plan.summary()}

## Verification

{verdict}

{_quantised_rows(bake)}

Every number is in `{VERIFICATION_FILE}`; the inputs, the fold plan and every tensor written are in
`{PROVENANCE_FILE}`.

## How to load

```
llama-cli -m {name} -p "The movie was"
```

```python
from llama_cpp import Llama

llm = Llama(model_path="{name}")
```

## Reproduce

```
{command}
```
"""
