"""The child process that runs a GGUF file in llama.cpp (llama-cpp-python) for :mod:`bake.llamacpp`.

Why a process of its own: llama.cpp is native code with its own thread pool (OpenMP in the
sdist build), loaded next to torch's; in a process that also runs torch, llama-cpp-python 0.3.36
built from its sdist has died with SIGSEGV inside ``llama_decode``, taking the bake (and a test
session) with it.  Here llama.cpp runs where torch is never imported, and a native crash ends this
process only: the parent reports it as an error naming the signal.

Loaded by file path (:func:`bake.llamacpp.worker_command`), not as ``bake.llamacpp_worker``, so the
``bake`` package (and torch with it) is not imported: this file imports the standard library, numpy
and llama_cpp only.

Protocol over stdin/stdout (the parent is the only peer; no pickle): each request is one JSON line;
each reply is one JSON line, followed, when the reply says ``"bytes": n``, by ``n`` bytes of a
little-endian float32 array of the reply's ``"shape"``.

* start: ``{"ok": true, "n_vocab": V, "torch_loaded": false}`` or ``{"ok": false, "error": "..."}`` (then the process exits 3)
* ``{"op": "logits", "tokens": [...]}``: every position's logits, ``[len(tokens), V]``
* ``{"op": "greedy", "prompt": [...], "n_new": N}``: ``{"ok": true, "tokens": [...], "seconds": s}``,
  decoded one token at a time through llama.cpp's KV cache (the prompt's evaluation is timed too)
* ``{"op": "close"}``: the process exits 0
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

GGML_TYPE_F32 = 0  # ggml.h: enum ggml_type, GGML_TYPE_F32 = 0


def _send(out, header: dict, payload: bytes = b"") -> None:
    if payload:
        header["bytes"] = len(payload)
    out.write(json.dumps(header).encode() + b"\n")
    if payload:
        out.write(payload)
    out.flush()


def _logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.ascontiguousarray(np.asarray(llm.scores[:len(tokens)], dtype="<f4"))


def _greedy(llm, prompt: list[int], n_new: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    got: list[int] = []
    for i in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        if i < n_new - 1:
            llm.eval([nxt])
    return got, time.perf_counter() - t0


def serve(path: str, n_ctx: int, threads: int, f32_cache: bool, inp=None, out=None) -> int:
    inp = inp or sys.stdin.buffer
    out = out or sys.stdout.buffer
    try:
        from llama_cpp import Llama

        kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
        llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                    n_threads=threads, n_threads_batch=threads, verbose=False, **kw)
    except Exception as e:  # noqa: BLE001 - any load failure is reported to the parent, which raises it
        _send(out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 3
    # torch_loaded: the reason for this process (tests assert it stays False)
    _send(out, {"ok": True, "n_vocab": int(llm.n_vocab()), "torch_loaded": "torch" in sys.modules})
    for line in inp:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "close":
                return 0
            if op == "logits":
                arr = _logits(llm, [int(t) for t in req["tokens"]])
                _send(out, {"ok": True, "shape": list(arr.shape)}, arr.tobytes())
            elif op == "greedy":
                tokens, seconds = _greedy(llm, [int(t) for t in req["prompt"]], int(req["n_new"]))
                _send(out, {"ok": True, "tokens": tokens, "seconds": seconds})
            else:
                _send(out, {"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - a failed request is answered, the process goes on
            _send(out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    _path, _n_ctx, _threads, _f32 = sys.argv[1:5]
    sys.exit(serve(_path, int(_n_ctx), int(_threads), _f32 == "1"))
