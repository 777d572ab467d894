"""The files that describe an export: provenance, verification report, model card.

Every export format writes into the same folder, and these three files are
written once for that folder by :func:`bake.formats.export.export` (after all
exporters ran, so the verification report holds their checks too).  They only
need an :class:`ExportInfo`, so another exporter or publisher can rebuild them.

The provenance file is written last (:func:`seal`): its ``integrity`` record holds the size and sha256
of every other file in the folder, subfolders included, the card and the verification report too; it
cannot hold its own hash, so it covers everything but itself (:mod:`bake.publish.integrity`).  ``lineas-bake
push`` recomputes them (:func:`bake.publish.hub.plan_push`) and refuses a folder that is not the intact export.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bake.plan.history import PROVENANCE_FILE
from bake.publish.integrity import INTEGRITY_KEY, integrity_record
from lineas.io import atomic_write_text

VERIFICATION_FILE = "lineas_verification.json"
CARD_FILE = "README.md"
CARD_TAGS = ("activation-steering", "lineas", "steered")
UNVERIFIED_BANNER = "Not verified: files changed after the bake"  # what push --force puts in such a card


@dataclass
class ExportInfo:
    """Everything the three files say, gathered from a :class:`bake.api.BakedModel` and the export options."""

    base_model: str  # human/Hub name, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    base_path: str  # resolved directory or Hub id
    base_config_sha256: str
    maps: list[dict]  # MapsSource.describe() per maps input, in application order
    plan_summary: str
    plan_table: str
    plan: dict
    report: object  # bake.verify.check.VerificationReport
    dtype: str
    formats: Sequence[str]
    command: str
    remote_code: bool
    has_tokenizer: bool
    files: list[str] = field(default_factory=list)
    extra_load: list[str] = field(default_factory=list)  # how-to-load snippets added by other exporters
    bakes: list[dict] = field(default_factory=list)  # config lineas_baked: every bake in the model, this one last
    pipeline_tag: str = ""  # the card's pipeline_tag when it is not the causal LM's ("image-text-to-text": a VLM)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def package_versions() -> dict:
    import torch
    import transformers

    from lineas import __version__

    return {"lineas-bake": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def provenance_dict(info: ExportInfo) -> dict:
    return {
        "tool": "lineas-bake", "versions": package_versions(), "created": info.created, "command": info.command,
        "base_model": {"name": info.base_model, "path": info.base_path, "config_sha256": info.base_config_sha256},
        "maps": info.maps,
        "strengths": [m["strength"] for m in info.maps],
        "export": {"dtype": info.dtype, "formats": list(info.formats), "trust_remote_code_needed": info.remote_code,
                   "tokenizer_copied": info.has_tokenizer, "files": sorted(info.files)},
        "verification": {"skipped": info.report.skipped, "passed": info.report.passed and not info.report.skipped,
                         "file": VERIFICATION_FILE},
        "bakes": info.bakes,
        "plan_summary": info.plan_summary,
        "plan": info.plan,
    }


def write_json(path: Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def seal(out_dir: Path, record: dict) -> Path:
    """Write ``record`` as the folder's provenance file with the integrity record of every other file in
    the folder: call it after every other file is written (the card included)."""
    record = {**record, INTEGRITY_KEY: integrity_record(Path(out_dir))}
    return write_json(Path(out_dir) / PROVENANCE_FILE, record)


def write_provenance(out_dir: Path, info: ExportInfo) -> Path:
    """The provenance file, sealed (:func:`seal`): write it last."""
    return seal(Path(out_dir), provenance_dict(info))


def write_verification(out_dir: Path, report) -> Path:
    return write_json(Path(out_dir) / VERIFICATION_FILE, report.to_dict())


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def front_matter(info: ExportInfo) -> str:
    lines = ["---", f"base_model: {_yaml_str(info.base_model)}", "library_name: transformers"]
    lines += [f"pipeline_tag: {info.pipeline_tag}"] if info.pipeline_tag else []
    lines.append("tags:")
    lines += [f"- {t}" for t in CARD_TAGS]
    lines.append("---")
    return "\n".join(lines)


def _maps_section(info: ExportInfo) -> str:
    out = ["| # | maps file | sha256 | method | sites | strength λ | trained on (source → target) |",
           "|---|---|---|---|---|---|---|"]
    for i, m in enumerate(info.maps, 1):
        sites = m["sites"]
        shown = ", ".join(f"`{s}`" for s in sites[:4]) + (f" … ({len(sites)} sites)" if len(sites) > 4 else "")
        data = f"{m.get('source') or '?'} → {m.get('target') or '?'}"
        out.append(f"| {i} | `{Path(m['origin']).name}` | `{m['sha256'][:12]}` | {m['method']} | {shown} | "
                   f"{m['strength']:g} | {data} |")
    return "\n".join(out)


def _bakes_section(info: ExportInfo) -> str:
    """Every bake in the model when this one went on top of earlier ones (empty for a first bake)."""
    if len(info.bakes) < 2:
        return ""
    out = ["## Bakes in this model", "",
           f"This model carries {len(info.bakes)} bakes, applied in this order (recorded in `config.json` as "
           "`lineas_baked`); the last one is described above.", "",
           "| # | maps (sha256) | strength λ | sites | effective digest |", "|---|---|---|---|---|"]
    for i, b in enumerate(info.bakes, 1):
        maps = "<br>".join(f"`{m.get('origin', '?')}` (`{str(m.get('sha256', ''))[:12]}`)" for m in b.get("maps", []))
        lam = ", ".join(f"{m['strength']:g}" if isinstance(m.get("strength"), (int, float)) else "?"
                        for m in b.get("maps", []))
        out.append(f"| {i} | {maps or '?'} | {lam or '?'} | {b.get('sites', '?')} | "
                   f"`{str(b.get('effective_digest') or '?')[:12]}` |")
    return "\n".join(out) + "\n\n"


def _load_section(info: ExportInfo, repo: str) -> str:
    trust = ", trust_remote_code=True" if info.remote_code else ""
    parts = []
    if info.remote_code:
        parts.append("Some steered sites could not be folded into existing weights, so the model carries small "
                     "affine modules (`modeling_lineas.py` in this folder). Loading needs `trust_remote_code=True`; "
                     "read that file first -- it is plain torch, `y -> scale * y + shift`.")
    else:
        parts.append("The steering is folded into the weights: the checkpoint is a standard "
                     "transformers model and loads without `trust_remote_code`.")
    tok = (f'tok = AutoTokenizer.from_pretrained("{repo}")\n'
           'ids = tok("The movie was", return_tensors="pt")\n'
           "print(tok.decode(model.generate(**ids, max_new_tokens=20)[0]))\n") if info.has_tokenizer else \
        "# this checkpoint has no tokenizer: use the base model's\n"
    auto = "AutoModelForImageTextToText" if info.pipeline_tag == "image-text-to-text" else "AutoModelForCausalLM"
    if auto != "AutoModelForCausalLM" and not info.remote_code:
        parts[-1] += (" It is a vision-language model: its vision tower and projector are the base model's, "
                      "unchanged, and its processor files are copied (`AutoProcessor.from_pretrained`).")
    parts.append(f"```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
                 f'model = {auto}.from_pretrained("{repo}"{trust})\n' + tok + "```")
    parts.extend(info.extra_load)
    return "\n\n".join(parts)


def base_link(name: str) -> str:
    looks_like_hub_id = name.count("/") == 1 and not Path(name).expanduser().exists()
    return f"[{name}](https://huggingface.co/{name})" if looks_like_hub_id else f"`{name}`"


def render_card(info: ExportInfo, repo: str = "path/to/this/folder") -> str:
    report = info.report
    if report.skipped:
        verdict = ("**Verification was skipped (`--no-verify`)**: nothing checks that this model reproduces the "
                   "hooked model. Treat it as unverified.")
    elif report.passed:
        verdict = ("The baked model was compared with the original model plus steering hooks, in float32, on "
                   "built-in prompts, random token sequences of several lengths and a padded batch; "
                   f"greedy generation of {report.n_tokens} new tokens was token-identical.")
    else:
        verdict = "**Verification failed**; see the table."
    warn = "".join(f"\n- warning: {w}" for w in report.warnings)
    strengths = ", ".join(f"{m['strength']:g}" for m in info.maps)
    code = (" (a few small affine modules ship as remote code, see below)" if info.remote_code
            else " and without extra code")
    return f"""{front_matter(info)}

# {info.base_model} — steered with lineas-bake

This model is {base_link(info.base_model)} with per-neuron affine activation-steering
maps (LinEAS / Linear-AcT) **baked into its weights**: it behaves like the base model with the steering hooks
attached at strength λ = {strengths}, without hooks{code}.

## What was steered

{_maps_section(info)}

At strength λ each map acts as `y -> y + λ (T(y) - y)` on the output of its site; several maps are composed in
the order listed.

{_bakes_section(info)}## How it was folded

{info.plan_summary}

```
{info.plan_table}
```

{_runtimes_section(info)}## Verification

{verdict}{warn}

```
{report.to_table()}
```

Metric definitions and every probe's numbers are in `{VERIFICATION_FILE}`; the exact inputs (maps sha256, λ,
command line, fold plan) are in `{PROVENANCE_FILE}`. Exported dtype: `{info.dtype}`.

## How to load

{_load_section(info, repo)}

## Reproduce

```
{info.command}
```
"""


def _runtimes_section(info: ExportInfo) -> str:
    """Which runtimes load this export without custom code (the plan's matrix, bake.plan.runtimes)."""
    verdicts = (info.plan or {}).get("runtimes") or []
    if not verdicts:
        return ""
    from bake.plan.runtimes import checked_on_export, matrix_markdown

    checked = checked_on_export(info.report.checks)
    return ("## Runtimes\n\nDoes this export load without custom code? \"checked on this export\": this export was run "
            "in the runtime and compared with the hooked model before it was written; \"tested here\": lineas-bake's "
            "tests run it; \"read from source\": the runtime's source, cited.\n\n"
            + matrix_markdown(verdicts, checked) + "\n\n")


def write_card(out_dir: Path, info: ExportInfo, repo: str = "path/to/this/folder") -> Path:
    path = Path(out_dir) / CARD_FILE
    atomic_write_text(path, render_card(info, repo))
    return path


def unverified_card(text: str, problems: Sequence[str]) -> str:
    """``text`` (a model card) with its ``## Verification`` section replaced by a "not verified" one naming
    ``problems``; a card without that section gets it after its front matter.  What ``lineas-bake push
    --force`` uploads instead of the card of a folder that is not the intact export."""
    shown = [f"- {p}".replace("\n", "\\n").replace("\r", "\\r")[:300] for p in problems[:20]]
    shown += [f"- … and {len(problems) - 20} more"] if len(problems) > 20 else []
    section = ("## Verification\n\n**Not verified: files changed after the bake.** This folder was uploaded with "
               "`lineas-bake push --force` although it is not the intact export lineas-bake wrote and checked "
               f"(`{PROVENANCE_FILE}` records the sha256 of every file it wrote):\n\n" + "\n".join(shown) +
               f"\n\nNo check vouches for these files; `{VERIFICATION_FILE}`, if present, describes the files the "
               "bake wrote, not these.\n\n")
    found = re.search(r"^## Verification[ \t]*$", text, flags=re.MULTILINE)
    if found is not None:
        after = re.search(r"^## ", text[found.end():], flags=re.MULTILINE)
        end = found.end() + after.start() if after else len(text)
        text, section = text[:found.start()] + section + text[end:], ""
    front = re.match(r"---\n.*?\n---\n", text, flags=re.DOTALL)
    cut = front.end() if front else 0
    banner = (f"> **{UNVERIFIED_BANNER}**: uploaded with `lineas-bake push --force`; the files are not the ones "
              "lineas-bake wrote and checked (see Verification).\n\n")
    return text[:cut] + ("\n" if cut else "") + banner + section + text[cut:].lstrip("\n")


def command_line(argv: Sequence[str] | None = None) -> str:
    import shlex

    argv = list(sys.argv if argv is None else argv)
    return " ".join(shlex.quote(a) for a in argv)
