"""Checking an in-place GGUF bake in llama.cpp itself, in two steps (issue 27).

The reference is the *source file* dequantised by transformers' GGUF loader (``gguf_file=``, which calls the
same ``gguf.quants.dequantize``), with the steering hooks: :func:`dequantised_source`, then
:func:`bake.verify.check.record_reference`.

* **exact** (gating): the baked file dequantised to F32 as a scratch copy (:func:`bake.formats.gguf_inplace.
  write_gguf` with ``dequantise_all``), run in llama.cpp, against the hooked reference under the
  ``gguf-inplace-exact`` row: float32 tolerance and identical greedy tokens (teacher-forced on the probes and
  decoded through llama.cpp's KV cache).  This is the fold itself, without the quantised matmul: the F32 copy
  multiplies by exactly the matrices the reference multiplies by.
* **quantised** (relative): llama.cpp multiplies quantised blocks by 8-bit-quantised activations, so even the
  unsteered source file is far from its dequantised self in transformers.  That unsteered pair (source file in
  llama.cpp vs the dequantised source, no hooks) is measured first, and the steered pair (baked file vs the
  hooked reference) reported beside it: top-1, KL, greedy agreement.  The steered pair gates only on gross
  failures: KL above ``gguf-inplace-quantised``'s multiple of the unsteered pair's.
* **visible**: the baked file's logits in llama.cpp differ from the source file's by more than the float32
  check's limit (the steering is in the file).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from bake.formats.gguf_inplace import GGUFFold, write_gguf
from bake.formats.llamacpp import greedy_decode, llamacpp_runner, load_llamacpp
from bake.store.gguf_file import GGUFStore
from bake.verify.check import GUARD_ROW, Reference, compare, greedy_tokens, torch_runner
from bake.verify.probes import PROMPTS, encode_prompt
from bake.verify.tolerances import GGUF_INPLACE_KL_FLOOR, GGUF_INPLACE_KL_MULTIPLE, get_tolerance

log = logging.getLogger(__name__)

EXACT_ROW = "gguf-inplace-exact"
UNSTEERED_ROW = "gguf-inplace-unsteered"
QUANTISED_ROW = "gguf-inplace-quantised"


def dequantised_source(path: Path, *, with_tokenizer: bool = True):
    """The GGUF file as transformers loads it (every tensor dequantised to float32), and its tokenizer (None
    when transformers cannot build one from the file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    try:
        from transformers import GgufConfig  # transformers 5: ask for dense weights

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    # eager attention: sdpa drops Gemma-2's attention logit soft-capping, which llama.cpp applies
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager", **kw).eval()
    tok = None
    if with_tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            # a tokenizer transformers builds but that cannot encode text, or gives ids beyond the model's vocabulary
            if any(int(i) >= model.config.vocab_size for t in PROMPTS for i in encode_prompt(tok, t)):
                raise ValueError("its ids exceed the model's vocabulary")
        except Exception as e:  # noqa: BLE001 - the probes fall back to token ids
            tok = None
            log.warning("no usable tokenizer from %s (%s): the probes are token ids only", path.name, e)
    return model, tok


@torch.no_grad()
def unsteered_reference(model, ref: Reference) -> Reference:
    """The model without hooks on ``ref``'s probes and greedy prompts (the quantised check's unsteered pair)."""
    run = torch_runner(model)
    logits = [run(p.input_ids, p.attention_mask) for p in ref.probes]
    greedy = greedy_tokens(run, ref.greedy_prompts, ref.n_tokens)
    return Reference(ref.probes, logits, ref.greedy_prompts, greedy, ref.n_tokens, [], {}, ref.diag_probe)


def _kv_greedy(llm, ref: Reference, check) -> dict:
    """Greedy decoding through llama.cpp's KV cache against the reference's tokens; a mismatch fails ``check``."""
    got = greedy_decode(llm, ref.greedy_prompts, ref.n_tokens).tokens
    same = sum(g == w for g, w in zip(got, ref.greedy))
    firsts = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), None) for w, g in zip(ref.greedy, got)]
    for w, g in zip(ref.greedy, got):
        check.greedy_detail.append({"path": "llama.cpp kv-cache decoding", "identical": w == g, "reference": w,
                                    "candidate": g})
    if same != len(got) and check.tolerance.greedy_identical:
        check.failures.append(f"greedy decoding through llama.cpp's KV cache differs on {len(got) - same}/{len(got)} "
                              "prompts")
    return {"prompts": len(got), "tokens": ref.n_tokens, "identical": same, "first_divergence": firsts}


def exact_check(baked: Path, scratch: Path, ref: Reference, *, progress=False):
    """The baked file dequantised to F32 (``scratch``, removed afterwards) in llama.cpp vs the hooked reference."""
    try:
        write_gguf(GGUFStore(baked), GGUFFold(), scratch, dequantise_all=True)
        with load_llamacpp(scratch) as llm:
            check, _ = compare(llamacpp_runner(llm), ref, EXACT_ROW, label="gguf in place, dequantised to f32 "
                               "(llama.cpp)", progress=progress)
            details = {"greedy_kv_cache": _kv_greedy(llm, ref, check), "llama_cpp_weight_repack": llm.weight_repack}
    finally:
        scratch.unlink(missing_ok=True)
    return check, details


def _max_rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30))


def quantised_checks(source: Path, baked: Path, ref: Reference, unsteered: Reference, *, progress=False):
    """(unsteered pair, steered pair, details): both quantised files in llama.cpp; the steered pair's KL limit is
    a multiple of the unsteered pair's (``gguf-inplace-quantised``), and the baked file must differ from the
    source (visible steering)."""
    with load_llamacpp(source) as src:
        base, _ = compare(llamacpp_runner(src), unsteered, UNSTEERED_ROW,
                          label="gguf source file, unsteered (llama.cpp vs transformers dequantised)",
                          progress=progress)
        src_logits = [torch.from_numpy(src.logits(p.tolist()).copy()) for p in ref.greedy_prompts]
    limit = max(GGUF_INPLACE_KL_MULTIPLE * base.mean_kl, GGUF_INPLACE_KL_FLOOR)
    tol = replace(get_tolerance(QUANTISED_ROW), max_mean_kl=limit)
    with load_llamacpp(baked) as llm:
        steered, _ = compare(llamacpp_runner(llm), ref, tol, label="gguf in place, quantised (llama.cpp vs hooked)",
                             progress=progress)
        baked_logits = [torch.from_numpy(llm.logits(p.tolist()).copy()) for p in ref.greedy_prompts]
        kv = _kv_greedy(llm, ref, steered)
    moved = max(_max_rel(s, b) for s, b in zip(src_logits, baked_logits))
    need = get_tolerance(GUARD_ROW).max_rel_limit(ref.noise_floor.max_rel if ref.noise_floor is not None else None)
    if not moved > need:
        steered.failures.append(f"the baked file's logits in llama.cpp differ from the source file's by {moved:.3g} "
                                f"(max rel) <= {need:.3g}: the steering is not visible in the file")
    details = {"unsteered_mean_kl": base.mean_kl, "unsteered_top1": base.top1, "kl_limit": limit,
               "visible_max_rel": moved, "visible_limit": need, "greedy_kv_cache": kv}
    return base, steered, details


def affines_of(maps: Mapping) -> dict:
    return {s: (m.scale, m.shift) for s, m in maps.items()}
