"""The demo's runtime check: the baked checkpoint in plain transformers, ONNX Runtime and llama.cpp (its f32 and
q4_K_M files), token for token and text for text against the hooked model, and their speed in the same run; vLLM's
and MLX's rows come from the bake's own serving check (``lineas-bake --check-runtime vllm,mlx``, each runtime in its
own environment)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lineas import evaluate as E
from lineas.hooks import steered
from lineas.maps import SteeringMaps

log = logging.getLogger("lineas.demo")


def load_ort(folder: Path, threads: int):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ORTModelForCausalLM.from_pretrained(folder, subfolder="onnx", provider="CPUExecutionProvider",
                                               session_options=so, use_cache=True)


LLAMA_CPP = "baked (llama.cpp, f32 GGUF)"
LLAMA_CPP_Q4 = "baked (llama.cpp, q4_K_M GGUF)"  # advisory: quantisation changes tokens, of the base model too
SERVED = {"vllm": "baked (vLLM)", "mlx": "baked (MLX)"}
SERVING_REPORT = "lineas_serving_check.json"  # bake.formats.serving.REPORT_FILE, read as data (no bake import)


def served_rows(baked_dir: Path) -> dict[str, dict]:
    """vLLM's and MLX's rows from the bake's serving check (greedy 8 prompts x 32 tokens from text prompts)."""
    import json

    path = baked_dir / SERVING_REPORT
    if not path.is_file():
        return {}
    report = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for runtime, r in report.get("runtimes", {}).items():
        n = r.get("prompts_checked", 0)
        out[SERVED.get(runtime, runtime)] = {
            "identical": r.get("greedy_identical") == n and r.get("text_identical") == n and n > 0,
            "n_identical": r.get("greedy_identical"), "n_prompts": n, "text_identical": r.get("text_identical"),
            "tokens": report.get("tokens"), "tokens_per_s": r.get("tokens_per_s"),
            "how": f"lineas-bake --check-runtime {runtime}: {n} prompts x {report.get('tokens')} tokens from text, "
                   f"{'batched' if r.get('batched') else 'one prompt at a time'}",
            "versions": r.get("versions", {})}
    return out


def llamacpp_generate(llm, tok, prompts: list[str], n_new: int) -> E.Generations:
    """Fixed-length greedy continuations in llama.cpp, one prompt at a time (the prompt's evaluation timed too)."""
    from bake.formats.llamacpp import greedy_decode

    rows = E.encode_prompts(tok, prompts)
    d = greedy_decode(llm, rows, n_new)
    return E.Generations(tuple(prompts), tuple(tok.decode(t, skip_special_tokens=True) for t in d.tokens),
                         tuple(tuple(t) for t in d.tokens), tuple(tuple(r) for r in rows), d.seconds)


def runtime_check(base, tok, maps: SteeringMaps, baked_dir: Path, prompts: list[str], cfg) -> dict:
    """Greedy tokens of baked HF (plain transformers), ONNX Runtime and llama.cpp vs the hooked model, plus tokens/s.

    ``cfg``: the demo's :class:`lineas.demo.pipeline.DemoConfig` (``formats``, ``threads``, ``check_tokens``,
    ``speed_repeats``).

    Every runner generates the same prompts with the same batching, fixed length
    (no early stop), so rows compare token by token.  The timing is interleaved
    (see :func:`lineas.evaluate.benchmark`).
    """
    from transformers import AutoModelForCausalLM

    baked_hf = AutoModelForCausalLM.from_pretrained(baked_dir, dtype=torch.float32).eval()
    runners_models = {"base": base, "baked (transformers)": baked_hf}
    ort_model, ort_error = None, None
    if "onnx" in cfg.formats:
        try:
            ort_model = load_ort(baked_dir, cfg.threads)
        except Exception as e:  # report, do not hide: the check then counts as failed
            ort_error = f"{type(e).__name__}: {e}"
            log.error("could not load the ONNX export: %s", ort_error)
    llms, llm_errors = {}, {}
    for name, fmt, file in ((LLAMA_CPP, "gguf", "model-f32.gguf"), (LLAMA_CPP_Q4, "gguf-q4_k_m", "model-q4_k_m.gguf")):
        if fmt not in cfg.formats.split(","):
            continue
        try:
            from bake.formats.llamacpp import load_llamacpp

            llms[name] = load_llamacpp(baked_dir / "gguf" / file, threads=cfg.threads)
        except Exception as e:  # report, do not hide: the check then counts as failed
            llm_errors[name] = f"{type(e).__name__}: {e}"
            log.error("could not load %s in llama.cpp: %s", file, llm_errors[name])
    last: dict[str, E.Generations] = {}

    def gen(name, model, hooked=False):
        def run():
            kw = dict(max_new_tokens=cfg.check_tokens, batch_size=len(prompts), fixed_length=True)
            if hooked:
                with steered(model, maps, 1.0):
                    g = E.generate(model, tok, prompts, **kw)
            else:
                g = E.generate(model, tok, prompts, **kw)
            last[name] = g
            return g
        return run

    runners = {"base": gen("base", base), "hooked": gen("hooked", base, hooked=True),
               "baked (transformers)": gen("baked (transformers)", baked_hf)}
    if ort_model is not None:
        runners["baked (ONNX Runtime)"] = gen("baked (ONNX Runtime)", ort_model)
    for name, llm in llms.items():
        def run_llamacpp(name=name, llm=llm):
            last[name] = llamacpp_generate(llm, tok, prompts, cfg.check_tokens)
            return last[name]
        runners[name] = run_llamacpp
    try:
        speed = E.benchmark(runners, repeats=cfg.speed_repeats)
    finally:
        for llm in llms.values():
            llm.close()  # llama.cpp's own process (bake.formats.llamacpp)
    del runners_models
    ref = last["hooked"]
    comparisons = {}
    for name in ("base", "baked (transformers)", "baked (ONNX Runtime)", LLAMA_CPP, LLAMA_CPP_Q4):
        if name == LLAMA_CPP_Q4 and name not in last and name not in llm_errors:
            continue  # not asked for
        if name not in last:
            comparisons[name] = {"identical": False,
                                 "error": (llm_errors.get(name) if name in (LLAMA_CPP, LLAMA_CPP_Q4) else ort_error)
                                 or "not run"}
            continue
        c = E.compare_tokens(ref, last[name])
        comparisons[name] = {"identical": c.identical, "n_identical": c.n_identical, "n_prompts": c.n_prompts,
                             "first_mismatch": c.first_mismatch,
                             "text_identical": sum(a == b for a, b in zip(ref.texts, last[name].texts))}
        if name == LLAMA_CPP_Q4:
            comparisons[name]["advisory"] = ("a 4-bit file: its tokens differ from the fp32 model's, as the base "
                                             "model's q4_K_M file's differ from the base model's (the bake's GGUF "
                                             "report has both pairs)")
    served = served_rows(baked_dir)
    comparisons.update(served)
    return {
        "prompts": prompts, "tokens": cfg.check_tokens, "comparisons_vs_hooked": comparisons,
        "hooked_sample": {"prompt": prompts[0], "continuation": ref.texts[0]},
        "tokens_per_s": {**{k: round(v.tokens_per_second, 1) for k, v in speed.items()},
                         **{k: v["tokens_per_s"] for k, v in served.items() if v.get("tokens_per_s") is not None}},
        "tokens_per_s_all": {k: [round(x, 1) for x in v.all_tokens_per_second] for k, v in speed.items()},
        "tokens_per_run": {k: v.new_tokens for k, v in speed.items()},
    }
