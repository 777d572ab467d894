"""llama.cpp as a verification candidate, through llama-cpp-python.

A GGUF file is checked the way every other export is: :func:`llamacpp_runner` makes the loaded
model an ``(input_ids, attention_mask) -> logits`` runner for :func:`bake.verify.compare` (each row
evaluated alone, up to its last real token: llama.cpp takes no attention mask, and probes are
right-padded), and :func:`greedy_decode` decodes token by token through llama.cpp's own KV cache,
which is what a user of the file runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lineas.threads import pick_threads

N_CTX = 512  # longest probe (33 tokens) or greedy prompt plus its new tokens fits with room to spare
GGML_TYPE_F32 = 0  # ggml.h: enum ggml_type, GGML_TYPE_F32 = 0


def load_llamacpp(path: Path, *, n_ctx: int = N_CTX, threads: int | None = None, f32_cache: bool = True):
    """The GGUF file in llama.cpp, every position's logits kept.

    ``f32_cache``: keep the KV cache in float32 (llama.cpp's default is float16), so that an f32 file is
    measured as a file, not together with a half-precision cache.
    """
    from llama_cpp import Llama

    # ggml's threads spin-wait for each other like torch's: on a machine busy with other work two threads
    # decoded SmolLM2 20x slower than one (1.1 vs 21.7 tokens/s), so leave out the cores the load takes.
    threads = threads or min(max(1, torch.get_num_threads()), pick_threads(0))
    kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_threads=threads, n_threads_batch=threads, verbose=False, **kw)


def _logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llamacpp_runner(llm):
    """``(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]``; padded positions are zeros
    (only positions with mask 1 are compared)."""
    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*input_ids.shape, llm.n_vocab(), dtype=torch.float32)
        for b in range(input_ids.shape[0]):
            valid = attention_mask[b].bool()
            n = int(valid.sum())
            if n:
                tokens = input_ids[b][:n].tolist()  # right padding: the real tokens come first
                out[b, :n] = torch.from_numpy(_logits(llm, tokens))
        return out

    return run


@dataclass(frozen=True)
class Decoded:
    tokens: list[list[int]]
    seconds: float  # prompt evaluation and decoding
    new_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def greedy_decode(llm, prompts, n_new: int) -> Decoded:
    """Greedy continuation of each prompt (a ``[P, L]`` tensor or token lists), one token at a time through
    llama.cpp's KV cache; ``seconds`` counts the prompt's evaluation too, as transformers' ``generate`` does."""
    rows, seconds = [], 0.0
    for prompt in (prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]):
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        got = []
        for i in range(n_new):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(nxt)
            if i < n_new - 1:
                llm.eval([nxt])
        seconds += time.perf_counter() - t0
        rows.append(got)
    return Decoded(rows, seconds, len(rows) * n_new)


def llama_cpp_python_version() -> str:
    try:
        import llama_cpp

        return getattr(llama_cpp, "__version__", "?")
    except ImportError:
        return "not installed"
