"""The child process that runs a GGUF file in llama.cpp (llama-cpp-python) for :mod:`bake.formats.llamacpp`.

Why a process of its own: llama.cpp is native code with its own thread pool (OpenMP in the
sdist build), loaded next to torch's; in a process that also runs torch, llama-cpp-python 0.3.36
built from its sdist has died with SIGSEGV inside ``llama_decode``, taking the bake (and a test
session) with it.  Here llama.cpp runs where torch is never imported, and a native crash ends this
process only: the parent reports it as an error naming the signal.

Loaded by file path (:func:`bake.formats.llamacpp.worker_command`), not as ``bake.formats.llamacpp_worker``, so the
``bake`` package (and torch with it) is not imported: this file imports the standard library, numpy
and llama_cpp only.

Protocol over stdin/stdout (the parent is the only peer; no pickle): each request is one JSON line;
each reply is one JSON line, followed, when the reply says ``"bytes": n``, by ``n`` bytes of a
little-endian float32 array of the reply's ``"shape"``.

* start: ``{"ok": true, "n_vocab": V, "torch_loaded": false, "weight_repack": bool, "repack_off": why or null}``
  or ``{"ok": false, "error": "..."}`` (then the process exits 3)
* ``{"op": "logits", "tokens": [...]}``: every position's logits, ``[len(tokens), V]``
* ``{"op": "greedy", "prompt": [...], "n_new": N}``: ``{"ok": true, "tokens": [...], "seconds": s}``,
  decoded one token at a time through llama.cpp's KV cache (the prompt's evaluation is timed too)
* ``{"op": "tokenize", "texts": [...]}``: ``{"ok": true, "ids": [[...], ...]}``, each text as llama.cpp's own
  tokenizer encodes it, special tokens added as the GGUF's metadata says (``add_bos_token``)
* ``{"op": "close"}``: the process exits 0
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np

GGML_TYPE_F32 = 0  # ggml.h: enum ggml_type, GGML_TYPE_F32 = 0

# Seen on this project's CI machines with Intel AMX (Sapphire Rapids or later): llama-cpp-python 0.3.36 built from
# its sdist (GGML_NATIVE, so with the AMX backend) dies with SIGSEGV in ggml_backend_amx_mul_mat at the
# first evaluation of any q8_0 file, SmolLM2's own unsteered one included; f32, f16 and bf16 weights
# never go to the AMX buffers.  With llama.cpp's extra weight buffers off (``llama-cli --no-repack``)
# the same files run.
AMX_REPACK_CRASH = ("this CPU has AMX_INT8, and llama.cpp's AMX kernels crash on quantized weights "
                    "(SIGSEGV in ggml_backend_amx_mul_mat, ggml-org/llama.cpp#20824): the file is checked "
                    "with weight repacking off, as `llama-cli --no-repack` runs it")


def repack_off_reason(system_info: str) -> str | None:
    """Why llama.cpp's extra weight buffers (AMX, CPU repack) are turned off on this machine, or ``None``;
    ``system_info`` is ``llama_print_system_info()``: the CPU features the build uses."""
    return AMX_REPACK_CRASH if "AMX_INT8 = 1" in system_info else None


@contextmanager
def _without_extra_buffers():
    """Let ``Llama()`` load with llama.cpp's extra weight buffers off (``use_extra_bufts``, ``--no-repack``):
    llama-cpp-python takes no argument for that field, so it is set on the default parameters it starts from."""
    import llama_cpp.llama as api

    if "use_extra_bufts" not in {name for name, _ in api.llama_cpp.llama_model_params._fields_}:
        raise RuntimeError("this llama-cpp-python has no llama_model_params.use_extra_bufts")
    default = api.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    api.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_cpp.llama_model_default_params = default


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


def serve(path: str, n_ctx: int, threads: int, f32_cache: bool, inp=None, out=None, vocab_only: bool = False) -> int:
    inp = inp or sys.stdin.buffer
    out = out or sys.stdout.buffer
    try:
        from llama_cpp import Llama, llama_print_system_info

        repack_off = repack_off_reason(llama_print_system_info().decode("utf-8", "replace"))
        kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
        with _without_extra_buffers() if repack_off else nullcontext():
            if vocab_only:  # the tokenizer only: no weights, no context (a crash there ends only this process)
                llm = Llama(model_path=path, vocab_only=True, verbose=False)
            else:
                llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                            n_threads=threads, n_threads_batch=threads, verbose=False, **kw)
    except Exception as e:  # noqa: BLE001 - any load failure is reported to the parent, which raises it
        _send(out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 3
    # torch_loaded: the reason for this process (tests assert it stays False); weight_repack: read back from
    # the parameters the model was loaded with
    _send(out, {"ok": True, "n_vocab": int(llm.n_vocab()), "torch_loaded": "torch" in sys.modules,
                "weight_repack": bool(llm.model_params.use_extra_bufts), "repack_off": repack_off})
    for line in inp:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "close":
                return 0
            if op == "logits":
                arr = _logits(llm, [int(t) for t in req["tokens"]])
                _send(out, {"ok": True, "shape": list(arr.shape)}, arr.tobytes())
            elif op == "tokenize":
                ids = [list(llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)) for t in req["texts"]]
                _send(out, {"ok": True, "ids": ids})
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
    sys.exit(serve(_path, int(_n_ctx), int(_threads), _f32 == "1", vocab_only=sys.argv[5:6] == ["vocab"]))
