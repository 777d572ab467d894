"""Render a demo's results.json as summary.md (the README figures are copied from it)."""

from __future__ import annotations

from pathlib import Path

from lineas.io import atomic_write_text


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(x) -> str:
    try:
        return f"{float(x):.3f}"
    except (TypeError, ValueError):
        return "n/a"


def metrics_table(conds: list[dict]) -> list[str]:
    base = next(c for c in conds if c["method"] == "unsteered")
    b_ppl = base["heldout"]["generation_ppl"]
    b_txt = base["fluency_text_ppl"]
    n_held, n_fig = base["heldout"]["n"], base["figure"]["n"]
    lines = [
        f"| method | λ | mean VADER compound ({n_held} held-out) | positive rate | generation ppl (unsteered model) "
        f"| neutral-text ppl (steered model) | mean compound ({n_fig} figure prompts) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [base] + [c for c in conds if c["method"] != "unsteered"]
    for c in rows:
        h = c["heldout"]
        name = "— (unsteered)" if c["method"] == "unsteered" else c["method"]
        dp = f" ({100 * (h['generation_ppl'] / b_ppl - 1):+.0f}%)" if c is not base else ""
        dt = f" ({100 * (c['fluency_text_ppl'] / b_txt - 1):+.0f}%)" if c is not base else ""
        lines.append(f"| {name} | {c['strength']:g} | {h['mean_compound']:+.3f} | {100 * h['positive_rate']:.0f}% "
                     f"| {h['generation_ppl']:.2f}{dp} | {c['fluency_text_ppl']:.1f}{dt} "
                     f"| {c['figure']['mean_compound']:+.3f} ({100 * c['figure']['positive_rate']:.0f}% pos.) |")
    return lines


def samples_table(conds: list[dict]) -> list[str]:
    lines = ["| method | λ | prompt | greedy continuation (40 tokens) | compound |", "|---|---|---|---|---|"]
    for c in conds:
        name = "—" if c["method"] == "unsteered" else c["method"]
        for s in c["samples"]:
            lines.append(f"| {name} | {c['strength']:g} | {_cell(s['prompt'])} | {_cell(s['continuation'])} "
                         f"| {s['compound']:+.2f} |")
    return lines


def runtime_table(rt: dict) -> list[str]:
    n, k = len(rt["prompts"]), rt["tokens"]
    lines = [f"| runtime | greedy tokens vs hooked ({n} prompts × {k} tokens, from text) | text identical | tokens/s |",
             "|---|---|---|---|"]
    cmp = rt["comparisons_vs_hooked"]
    tps = rt["tokens_per_s"]
    lines.append(f"| hooked (transformers + forward hooks) | reference | reference "
                 f"| {tps.get('hooked', float('nan')):.1f} |")
    order = ["baked (transformers)", "baked (ONNX Runtime)", "baked (llama.cpp, f32 GGUF)",
             "baked (llama.cpp, q4_K_M GGUF)", "baked (vLLM)", "baked (MLX)", "base"]
    for name in [x for x in order if x in cmp or x in order[:3] or x == "base"]:
        c = cmp.get(name, {})
        if "error" in c:
            verdict, text = f"not run: {_cell(c['error'], 80)}", "—"
        else:
            if c.get("identical") and c.get("n_identical") == c.get("n_prompts"):
                verdict = f"identical ({c['n_identical']}/{c['n_prompts']})"
            else:
                i, j = c.get("first_mismatch") or (None, None)
                verdict = f"{c.get('n_identical')}/{c.get('n_prompts')} identical" + (
                    f"; first difference: prompt {i}, token {j}" if i is not None else "")
            if c.get("how"):
                verdict += f" ({c['how']})"
            if c.get("advisory"):
                verdict += f"; advisory: {c['advisory']}"
            text = f"{c['text_identical']}/{c['n_prompts']}" if c.get("text_identical") is not None else "—"
        label = "base (unsteered, for contrast)" if name == "base" else name
        speed = tps.get(name)
        lines.append(f"| {label} | {verdict} | {text} | {'n/a' if speed is None else f'{speed:.1f}'} |")
    return lines


def render(results: dict) -> str:
    cfg = results["config"]
    m0, m1 = results["machine_start"], results.get("machine_end", {})
    out = [f"# lineas-bake demo: {results['model']}, {cfg['source']} → {cfg['target']}", "",
           f"Run `{results['run']}`, {results['created']}; total {results['total_seconds']:.0f} s on "
           f"{m0['cpu_count']} CPU core(s), {m0['threads']} torch thread(s), load average "
           f"{m0.get('load_average')} → {m1.get('load_average')} (timings are wall-clock on a possibly shared "
           "machine).", ""]
    tr = results["train"]
    out += ["## 1. Learn", ""]
    for method, t in tr.items():
        if t.get("given"):
            out.append(f"- {method}: maps given ({t['maps']})")
            continue
        out.append(f"- {method}: {t['n_sites']} sites, pooled W2² {t['w2_before']:.3g} → {t['w2_after']:.3g}, "
                   f"support {_num(t.get('support'))}, {t['seconds']:.0f} s  \n  `{t['command']}`")
    b = results["bake"]
    out += ["", "## 2. Bake", "", f"- {b['method']} maps at λ=1: {b['plan_summary']} ({b['seconds']:.0f} s)  \n"
            f"  `{b['command']}`", ""]
    if results.get("bake_gguf_in_place"):
        from lineas.demo.gguf_inplace import in_place_lines

        out += ["The same maps, baked into the quantised file itself (no full-precision weights):", ""]
        out += in_place_lines(results["bake_gguf_in_place"]) + [""]
    out += ["## 3. Efficacy and fluency", "",
            f"Greedy, {results['eval']['max_new_tokens']} new tokens, raw continuation of neutral sentence starts "
            "(no chat template). VADER compound of the continuation; positive = compound > 0.05. Generation "
            "perplexity: the continuations scored by the *unsteered* model given their prompts. Neutral-text "
            "perplexity: a fixed neutral paragraph scored by the *steered* model.", ""]
    out += metrics_table(results["eval"]["conditions"])
    out += ["", "Sample generations (first figure prompts):", ""]
    out += samples_table(results["eval"]["conditions"])
    rt = results.get("runtime_check")
    if rt:
        out += ["", "## 4. Runtimes", "",
                f"Baked checkpoint reloaded with plain `transformers.AutoModelForCausalLM`, the ONNX graph run by "
                f"`optimum.onnxruntime.ORTModelForCausalLM`, the f32 and q4_K_M GGUF files run by llama.cpp "
                f"(llama-cpp-python, float32 KV cache, one prompt at a time); fixed-length greedy generation from the "
                f"same text prompts, one batch of {len(rt['prompts'])} prompts, best of {cfg['speed_repeats']} "
                "interleaved runs. vLLM and MLX: the bake's own check (`--check-runtime vllm,mlx`), each runtime in "
                "its own environment given the text prompts, its tokenizer's ids compared first; their tokens/s "
                "are their own runs' (vLLM batches the prompts).", ""]
        out += runtime_table(rt)
    out += ["", "## Expectations", "", "| claim | measured | target | met |", "|---|---|---|---|"]
    for e in results["expectations"]:
        out.append(f"| {e['name']} | {e['value']} | {e['target']} | {'yes' if e['met'] else '**no**'} |")
    out += ["", "Step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["step_seconds"].items()), ""]
    return "\n".join(out)


def write_summary(path: Path, results: dict) -> None:
    atomic_write_text(path, render(results))
