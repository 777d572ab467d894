"""The demo's runtime check: the baked checkpoint in plain transformers, ONNX Runtime and llama.cpp, token
for token against the hooked model, and their speed in the same run."""

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
    llm, llm_error = None, None
    if "gguf" in cfg.formats.split(","):
        try:
            from bake.formats.llamacpp import load_llamacpp

            llm = load_llamacpp(baked_dir / "gguf" / "model-f32.gguf", threads=cfg.threads)
        except Exception as e:  # report, do not hide: the check then counts as failed
            llm_error = f"{type(e).__name__}: {e}"
            log.error("could not load the GGUF export in llama.cpp: %s", llm_error)
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
    if llm is not None:
        def run_llamacpp():
            last[LLAMA_CPP] = llamacpp_generate(llm, tok, prompts, cfg.check_tokens)
            return last[LLAMA_CPP]
        runners[LLAMA_CPP] = run_llamacpp
    try:
        speed = E.benchmark(runners, repeats=cfg.speed_repeats)
    finally:
        if llm is not None:
            llm.close()  # llama.cpp's own process (bake.formats.llamacpp)
    del runners_models
    ref = last["hooked"]
    comparisons = {}
    for name in ("base", "baked (transformers)", "baked (ONNX Runtime)", LLAMA_CPP):
        if name not in last:
            comparisons[name] = {"identical": False,
                                 "error": (llm_error if name == LLAMA_CPP else ort_error) or "not run"}
            continue
        c = E.compare_tokens(ref, last[name])
        comparisons[name] = {"identical": c.identical, "n_identical": c.n_identical, "n_prompts": c.n_prompts,
                             "first_mismatch": c.first_mismatch}
    return {
        "prompts": prompts, "tokens": cfg.check_tokens, "comparisons_vs_hooked": comparisons,
        "hooked_sample": {"prompt": prompts[0], "continuation": ref.texts[0]},
        "tokens_per_s": {k: round(v.tokens_per_second, 1) for k, v in speed.items()},
        "tokens_per_s_all": {k: [round(x, 1) for x in v.all_tokens_per_second] for k, v in speed.items()},
        "tokens_per_run": {k: v.new_tokens for k, v in speed.items()},
    }
