"""ONNX Runtime side of the ONNX export: open the exported graph and check it against the hooked model.

:func:`load_ort` opens the folder with ``ORTModelForCausalLM`` (the KV-cache shapes taken from the graph,
:func:`cache_shape_fix`); :func:`check_ort` compares it with the hooked reference
(:func:`bake.verify.check.compare`): logits on every probe and greedy tokens by full recompute
(:func:`ort_runner`), then greedy decoding through the KV cache (:func:`greedy_with_cache`), which must give
the same tokens.  Thresholds: the ``onnx-*`` rows of :mod:`bake.verify.tolerances` (the provider picks the row,
:func:`tolerance_for`).  Writing the graph is :mod:`bake.formats.onnx`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bake.verify.check import CheckResult, Reference, Runner, compare, first_divergence
from bake.verify.tolerances import Row

log = logging.getLogger(__name__)


def pick_provider() -> str:
    """CUDA when onnxruntime-gpu is installed *and* torch sees a GPU, else CPU."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def tolerance_for(provider: str) -> Row:
    return Row.ONNX_F32_CUDA if provider == "CUDAExecutionProvider" else Row.ONNX_F32


def load_ort(folder: Path, provider: str = "CPUExecutionProvider"):
    """``ORTModelForCausalLM`` on the exported folder, with the KV-cache shapes taken from the graph.

    optimum-onnx 0.1.0 sizes the empty past key/values from the config and gets
    them wrong for some architectures (Gemma2: it uses ``num_attention_heads``
    instead of ``num_key_value_heads``).  The graph declares the true sizes on
    its ``past_key_values.0.key`` input, so those are used when they are fixed.
    """
    return load_ort_with_fix(folder, provider)[0]


def load_ort_with_fix(folder: Path, provider: str = "CPUExecutionProvider"):
    """:func:`load_ort`, also returning the cache-shape fix it applied (see :func:`cache_shape_fix`)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(folder, provider=provider, use_cache=True)
    fix = cache_shape_fix(model)
    if fix is not None:
        log.info("ORT cache shape taken from the graph: %s (optimum derived %s from the config)",
                 fix["graph"], fix["optimum"])
        model.num_key_value_heads, model.embed_size_per_head = fix["graph"]
    return model, fix


def cache_shape_fix(ort_model) -> dict | None:
    """``{"optimum": (heads, dim), "graph": (heads, dim)}`` when optimum's config-derived KV-cache shape
    disagrees with the graph's declared ``past_key_values.0.key`` shape, else None."""
    shapes = {i.name: i.shape for i in ort_model.session.get_inputs()}
    key = shapes.get("past_key_values.0.key")
    if key is None or len(key) != 4 or not (isinstance(key[1], int) and isinstance(key[3], int)):
        return None
    derived = (getattr(ort_model, "num_key_value_heads", None), getattr(ort_model, "embed_size_per_head", None))
    return None if derived == (key[1], key[3]) else {"optimum": derived, "graph": (key[1], key[3])}


def _device_of(ort_model) -> torch.device:
    return torch.device(getattr(ort_model, "device", "cpu"))


def ort_runner(ort_model) -> Runner:
    """(input_ids, attention_mask) -> fp32 cpu logits, without past key/values (full recompute)."""
    dev = _device_of(ort_model)

    @torch.no_grad()
    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = ort_model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=True)
        return out.logits.detach().to("cpu", torch.float32)

    return run


@torch.no_grad()
def greedy_with_cache(ort_model, prompt: torch.Tensor, n_new: int) -> list[int]:
    """Greedy decoding that feeds one token at a time with the graph's past key/values."""
    dev = _device_of(ort_model)
    ids = prompt[None].to(torch.int64).to(dev)
    out = ort_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    tokens = []
    for i in range(n_new):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt[0, 0]))
        if i == n_new - 1:
            break
        ids = torch.cat([ids, nxt], dim=1)
        out = ort_model(input_ids=nxt, attention_mask=torch.ones_like(ids), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens


def check_ort(folder: Path, reference: Reference, *, provider: str | None = None, progress: bool | None = False,
              ) -> tuple[CheckResult, list[dict], dict | None]:
    """Compare the ONNX model in ORT with the hooked reference; the KV-cache greedy run joins the same check.

    Returns the check, the KV-cache greedy details and the cache-shape fix :func:`load_ort` applied (or None).
    """
    provider = provider or pick_provider()
    ort_model, fix = load_ort_with_fix(folder, provider)
    check, _ = compare(ort_runner(ort_model), reference, tolerance_for(provider),
                       label=f"onnx float32 ({provider.replace('ExecutionProvider', '')})", progress=progress)
    cached = []
    for prompt, want in zip(reference.greedy_prompts, reference.greedy):
        got = greedy_with_cache(ort_model, prompt, reference.n_tokens)
        first = first_divergence(want, got)
        cached.append({"prompt_len": int(prompt.numel()), "identical": want == got, "first_mismatch": first,
                       "reference": want, "candidate": got, "path": "kv-cache"})
    bad = [c for c in cached if not c["identical"]]
    check.greedy_detail.extend(cached)
    if bad and check.tolerance.greedy_identical:
        check.failures.append(f"greedy generation through the ONNX KV cache differs on {len(bad)}/{len(cached)} "
                              f"prompts ({reference.n_tokens} new tokens)")
    del ort_model
    return check, cached, fix


__all__ = ["cache_shape_fix", "check_ort", "greedy_with_cache", "load_ort", "load_ort_with_fix", "ort_runner",
           "pick_provider", "tolerance_for"]
