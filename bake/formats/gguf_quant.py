"""llama.cpp k-quant GGUF files (``--format gguf-q4_k_m``, ``gguf-q5_k_m``, ``gguf-q6_k``): llama.cpp's own
quantiser run on the verified f32 GGUF file of the same export, checked in llama.cpp.

No quantiser of ours: ``llama_model_quantize`` with ``llama_model_quantize_default_params()`` and only the file
type (``LLAMA_FTYPE_MOSTLY_Q4_K_M`` ...) and the thread count set, what ``llama-quantize`` runs, in a child
process where torch is never imported (:mod:`bake.formats.gguf_quantise`).  Its input is
``gguf/model-f32.gguf`` (``--format gguf``, so a k-quant format needs it in the same request:
:func:`bake.formats.kinds.check_request` names the fix).  A k-quant needs rows that are multiples of 256
weights; llama.cpp quantises a tensor whose rows are not (SmolLM2's 576) to a fallback type (Q5_0, Q5_1,
Q8_0), and the GGUF report lists the fallbacks and the tensor types the file really holds.

A quantised file cannot reproduce the hooked model, so its numbers are advisory, and they are read in a pair
(:mod:`bake.formats.gguf_base`):

* the steered file in llama.cpp vs the hooked model (:func:`bake.verify.check.compare`, the ``gguf-<type>`` row);
* the base model's file of the same type, converted and quantised the same way, vs the base model: what the
  quantisation alone costs.  Close numbers: the steering survives the quantisation.

Both go to the verification report (so the model card shows them) and to ``gguf/lineas_gguf_export.json``.
"""

from __future__ import annotations

from pathlib import Path

from bake.formats.baked import Baked
from bake.formats.base import ExportOptions, ExportResult, register_exporter
from bake.formats.gguf import GGUF_SUBDIR, GGUFExportError, write_report
from bake.formats.gguf_base import base_pair, pair_summary, steered_label
from bake.formats.gguf_quantise import FTYPES, quantise, tensor_types
from bake.formats.llamacpp import llamacpp_runner, load_llamacpp
from bake.plan.runtimes import Runtime, check_required
from bake.verify.check import compare
from bake.verify.tolerances import KQUANT_PAIR_KL_RATIO, gguf_row

F32_FILE = "model-f32.gguf"  # what --format gguf writes (bake.formats.gguf): the quantiser's input


def export_kquant(baked: Baked, folder: Path, opts: ExportOptions, *, fmt: str) -> ExportResult:
    """``gguf/model-<type>.gguf`` quantised by llama.cpp from ``gguf/model-f32.gguf``, checked in llama.cpp in a
    pair with the base model's file of the same type (see the module docstring)."""
    check_required(baked.plan, [Runtime.LLAMA_CPP])
    ftype = FTYPES[fmt]
    outtype = ftype.lower()
    out = folder / GGUF_SUBDIR
    src = out / F32_FILE
    if not src.is_file():
        raise GGUFExportError(f"--format {fmt} quantises {GGUF_SUBDIR}/{F32_FILE}, the verified f32 GGUF file of "
                              f"the same export, which is not there: add gguf (--format hf,gguf,{fmt})")
    path = out / f"model-{outtype}.gguf"
    details = {**quantise(src, path, ftype, progress=opts.progress), "quantised_from": F32_FILE,
               "tensor_types": tensor_types(path)}
    checks = []
    if baked.reference is not None:
        with load_llamacpp(path) as llm:  # llama.cpp in a process of its own (bake.formats.llamacpp)
            details["llama_cpp_weight_repack"] = llm.weight_repack
            if llm.repack_off:
                details["llama_cpp_repack_off"] = llm.repack_off
            steered, _ = compare(llamacpp_runner(llm), baked.reference, gguf_row(outtype),
                                 label=steered_label(outtype), progress=opts.progress)
        checks.append(steered)
        base_check, base_info = base_pair(baked, folder, fmt, opts)
        if base_check is not None and not steered.mean_kl <= KQUANT_PAIR_KL_RATIO * base_check.mean_kl:
            steered.failures.append(f"mean KL {steered.mean_kl:.3g} is more than {KQUANT_PAIR_KL_RATIO:g}x the base "
                                    f"model's {outtype} file's ({base_check.mean_kl:.3g}): the steering loses more "
                                    f"to {outtype} than the base model does")
        checks += [base_check] if base_check is not None else []
        details["pairs"] = {"steered_vs_hooked": pair_summary(steered), "base_vs_base": base_info}
    write_report(out, path, outtype, checks, details)
    return ExportResult(fmt, checks=checks, load_snippets=[card_snippet(path.name, outtype, details)])


def card_snippet(name: str, outtype: str, details: dict) -> str:
    """The model card's lines on one k-quant file: how it was made, the pair of numbers, how to run it."""
    text = f"`gguf/{name}` is llama.cpp's own {outtype} quantisation of `gguf/{F32_FILE}`"
    pairs = details.get("pairs")
    if pairs:
        s, b = pairs["steered_vs_hooked"], pairs["base_vs_base"]
        text += (f". Steered file vs hooked model: top-1 {s['top1']:.3f}, mean KL {s['mean_kl']:.3g}; ")
        text += (f"the base model's {outtype} file vs the base model (what the quantisation alone costs): top-1 "
                 f"{b['top1']:.3f}, mean KL {b['mean_kl']:.3g}." if b.get("measured") else
                 f"the base model's {outtype} file was not measured ({b['reason']}).")
    else:
        text += " (not checked: verification was off)."
    return text + f"\n\n```\nllama-cli -m gguf/{name} -p \"The movie was\"\n```"


for _fmt in FTYPES:
    register_exporter(_fmt, lambda baked, folder, opts, _fmt=_fmt: export_kquant(baked, folder, opts, fmt=_fmt))
