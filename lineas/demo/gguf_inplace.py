"""The demo's in-place bake: the embedded SmolLM2 Q4_1 GGUF file steered with the same maps, without the
full-precision weights (``lineas-bake --model <file>.gguf``), next to the HF path."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = {"gguf-inplace-exact": "exact", "gguf-inplace-unsteered": "unsteered pair",
        "gguf-inplace-quantised": "steered pair"}


def in_place_command(tool: list[str], maps: Path, out: Path, strength: float = 1.0) -> list[str]:
    """``lineas-bake --model <embedded Q4_1 file> --maps maps --out out`` (``tool``: how to run lineas-bake)."""
    from lineas.models import smollm2_gguf_path

    return tool + ["--model", str(smollm2_gguf_path()), "--maps", str(maps), "--strength", str(strength),
                   "--out", str(out)]


def in_place_results(cmd: list[str], seconds: float, out: Path) -> dict:
    """What the in-place bake wrote: its checks (from ``lineas_verification.json``) and the file sizes."""
    from lineas.models import smollm2_gguf_path

    source = smollm2_gguf_path()
    checks = json.loads((out / "lineas_verification.json").read_text(encoding="utf-8"))["checks"]
    rows = {}
    for c in checks:
        name = ROWS.get(c["tolerance"]["name"])
        if name:
            rows[name] = {"passed": c["passed"], "gating": c["gating"], "max_rel": c["max_rel"],
                          "mean_kl": c["mean_kl"], "top1": c["top1"],
                          "greedy": f"{c['greedy_matched']}/{c['greedy_total']}"}
    written = out / source.name
    return {"command": " ".join(cmd), "seconds": round(seconds, 1), "source": source.name,
            "source_bytes": source.stat().st_size, "written_bytes": written.stat().st_size, "checks": rows,
            "out": str(out)}


def in_place_lines(r: dict) -> list[str]:
    """The summary's section for :func:`bake_in_place`."""
    lines = [f"- `{r['source']}` ({r['source_bytes'] / 1e6:.0f} MB) steered in place in {r['seconds']:.0f} s, "
             f"written as {r['written_bytes'] / 1e6:.0f} MB: norms scaled, shifts folded into new F32 biases, every "
             "quantised tensor copied byte for byte  \n"
             f"  `{r['command']}`", "",
             "| check (llama.cpp) | max rel | mean KL | top-1 | greedy | gating | passed |",
             "|---|---|---|---|---|---|---|"]
    for name in ("exact", "unsteered pair", "steered pair"):
        c = r["checks"].get(name)
        if c:
            lines.append(f"| {name} | {_num(c['max_rel'])} | {_num(c['mean_kl'])} | {_num(c['top1'])} | {c['greedy']} "
                         f"| {'yes' if c['gating'] else 'no'} | {'yes' if c['passed'] else '**no**'} |")
    lines += ["", "exact: the baked file dequantised to F32, run in llama.cpp, against the hooked model (the source "
              "file dequantised by transformers, with hooks); unsteered pair: the source file in llama.cpp against "
              "its dequantised self (what llama.cpp's quantised arithmetic costs alone); steered pair: the baked "
              "file in llama.cpp against the hooked model, read beside the unsteered pair."]
    return lines


def _num(x) -> str:
    try:
        return f"{float(x):.3g}"
    except (TypeError, ValueError):
        return "n/a"
