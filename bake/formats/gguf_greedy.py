"""The long greedy check of a GGUF file: :data:`GREEDY_PROMPTS` x :data:`GREEDY_TOKENS` decoded by llama.cpp
through its KV cache against the hooked model's greedy decoding, with the first divergence reported.

The hooked reference: for :func:`bake.api.bake_folder` (what ``lineas-bake`` runs on a local
checkpoint), the source checkpoint with the steering hooks attached, with bounded memory; for an
in-memory :func:`bake.api.bake` the original weights are already folded, so the baked model (itself
checked against the hooked one) stands in, and the check's detail says so.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from bake.formats.baked import Baked
from bake.formats.llamacpp import greedy_decode
from bake.verify.check import CheckResult, bar_disabled, first_divergence
from bake.verify.probes import PROMPTS, encode_prompt, model_vocab_size, random_ids
from lineas.hooks import attach_affine

GREEDY_PROMPTS = PROMPTS + (
    "The best way to learn a new language is",
    "My neighbor said that",
    "The weather today is",
)
GREEDY_TOKENS = 32
SEED = 4321


def greedy_prompt_ids(model, tokenizer) -> torch.Tensor:
    """``[8, L]``: the prompts cut to the shortest (one unpadded batch), or random ids without a tokenizer."""
    vocab = model_vocab_size(model)
    if tokenizer is not None:
        rows = [r[r < vocab] for r in (encode_prompt(tokenizer, t) for t in GREEDY_PROMPTS)]
        n = min(r.numel() for r in rows)
        if n >= 2:
            return torch.stack([r[:n] for r in rows])
    return random_ids(len(GREEDY_PROMPTS), 6, vocab, torch.Generator().manual_seed(SEED))


@torch.no_grad()
def _generate(model, prompts: torch.Tensor, n_new: int) -> list[list[int]]:
    """Greedy decoding with transformers' KV cache, never stopping early (no eos)."""
    device = next(model.parameters()).device
    ids = prompts.to(device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
                         temperature=None, top_p=None, top_k=None)
    return out[:, prompts.shape[1]:].tolist()


def hooked_greedy(baked: Baked, prompts: torch.Tensor, n_new: int) -> tuple[list[list[int]], str]:
    """The reference tokens and what produced them."""
    if baked.source is None:
        return _generate(baked.model, prompts, n_new), "baked model in memory (checked against the hooked model)"
    from bake.store.checkpoint import load_bounded

    src = baked.source
    affines = {s: (m.scale, m.shift) for s, m in baked.effective.items()}
    with load_bounded(src.store.folder.folder, device=src.device, max_memory=src.max_memory,
                      trust_remote_code=src.trust_remote_code) as model:
        with attach_affine(model, affines):
            tokens = _generate(model, prompts, n_new)
        del model  # the last reference: load_bounded frees it
    return tokens, "hooked model (source weights + steering hooks)"


@torch.no_grad()
def _generate_scored(model, prompt: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """One prompt's greedy tokens and the log-probability (float64 log-softmax of the raw logits) of each."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.int64, device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
                         temperature=None, top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].double(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def hooked_greedy_scored(baked: Baked, prompts: list[list[int]], n_new: int
                         ) -> tuple[list[tuple[list[int], list[float]]], str]:
    """Like :func:`hooked_greedy`, one prompt at a time (each its full length, no batch): per prompt the greedy
    tokens and each one's log-probability; and what produced them."""
    if baked.source is None:
        return ([_generate_scored(baked.model, p, n_new) for p in prompts],
                "baked model in memory (checked against the hooked model)")
    from bake.store.checkpoint import load_bounded

    src = baked.source
    affines = {s: (m.scale, m.shift) for s, m in baked.effective.items()}
    with load_bounded(src.store.folder.folder, device=src.device, max_memory=src.max_memory,
                      trust_remote_code=src.trust_remote_code) as model:
        with attach_affine(model, affines):
            runs = [_generate_scored(model, p, n_new) for p in prompts]
        del model  # the last reference: load_bounded frees it
    return runs, "hooked model (source weights + steering hooks)"


def long_greedy_check(baked: Baked, llm, check: CheckResult, *, progress: bool | None = False) -> dict:
    """Decode in llama.cpp, compare with the hooked reference, add the rows to ``check`` (a failure when its
    tolerance wants identical greedy tokens).  Returns the details for the GGUF report."""
    prompts = greedy_prompt_ids(baked.model, baked.tokenizer)
    with tqdm(total=2, desc="gguf greedy", disable=bar_disabled(progress), leave=False) as bar:
        want, source = hooked_greedy(baked, prompts, GREEDY_TOKENS)
        bar.update()
        got = greedy_decode(llm, prompts, GREEDY_TOKENS)
        bar.update()
    rows = []
    for prompt, w, g in zip(prompts, want, got.tokens):
        first = first_divergence(w, g)
        rows.append({"prompt_len": int(prompt.numel()), "identical": first is None, "first_mismatch": first,
                     "reference": w, "candidate": g, "path": "llama.cpp kv-cache, 32 tokens"})
    check.greedy_detail.extend(rows)
    differ = [r for r in rows if not r["identical"]]
    check.greedy_matched += len(rows) - len(differ)  # the report's greedy column counts these prompts too
    check.greedy_total += len(rows)
    if differ and check.tolerance.greedy_identical:
        first = min(differ, key=lambda r: r["first_mismatch"])
        check.failures.append(f"llama.cpp greedy decoding differs from the {source} on {len(differ)}/{len(rows)} "
                              f"prompts ({GREEDY_TOKENS} tokens); first divergence at token {first['first_mismatch']}"
                              f" of prompt {rows.index(first)}")
    return {"greedy": {"prompts": len(rows), "tokens": GREEDY_TOKENS, "identical": len(rows) - len(differ),
                       "first_divergence": [r["first_mismatch"] for r in rows], "reference": source,
                       "llama_cpp_tokens_per_s": round(got.tokens_per_second, 1)}}
