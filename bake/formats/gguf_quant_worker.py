"""The child process that quantises a GGUF file with llama.cpp's own quantiser, for :mod:`bake.formats.gguf_quant`.

``llama_model_quantize`` (llama-cpp-python's binding of the function ``llama-quantize`` runs) with
``llama_model_quantize_default_params()`` and only the file type and the thread count set: the k-quant
files are what llama.cpp itself makes of the verified f32 file, no quantiser of ours.  It runs here, in a
process where torch is never imported, for the reasons :mod:`bake.formats.llamacpp_worker` gives (llama.cpp's
native threads apart from torch's, a native crash that ends this process only).

Loaded by file path (:func:`bake.formats.llamacpp.script_command`), not as a module of the ``bake``
package: this file imports the standard library and llama_cpp only.

Arguments: ``<f32 file> <output file> <ftype name, e.g. Q4_K_M> <threads>``.  llama.cpp's log goes to
stderr; the last line on stdout is one JSON object: ``{"ok": true, "seconds": s, "torch_loaded": false}`` or
``{"ok": false, "error": "..."}`` (then the exit status is 3).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time


def quantise(src: str, dst: str, ftype: str, threads: int) -> dict:
    """``src`` quantised to ``dst`` as llama.cpp's ``LLAMA_FTYPE_MOSTLY_<ftype>``."""
    import llama_cpp

    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if code is None:
        return {"ok": False, "error": f"this llama-cpp-python has no LLAMA_FTYPE_MOSTLY_{ftype}"}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = threads
    llama_cpp.llama_backend_init()
    t0 = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_backend_free()
    if rc != 0:
        return {"ok": False, "error": f"llama_model_quantize returned {rc}"}
    return {"ok": True, "seconds": time.perf_counter() - t0, "torch_loaded": "torch" in sys.modules}


def main(argv: list[str]) -> int:
    src, dst, ftype, threads = argv
    try:
        reply = quantise(src, dst, ftype, int(threads))
    except Exception as e:  # noqa: BLE001 - any failure is reported to the parent, which raises it
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0 if reply["ok"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:5]))
