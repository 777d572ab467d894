"""The llama.cpp worker's choice of weight buffers (no llama.cpp needed: the rule reads its system info)."""

import runpy

from bake.formats.llamacpp import WORKER

worker = runpy.run_path(str(WORKER))  # by path, as bake.formats.llamacpp runs it: llama_cpp is imported only in serve()

AMX_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
             "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
             "OPENMP = 1 | REPACK = 1 | ")  # llama_print_system_info() on this project's CI machine with AMX
AVX2_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
              "REPACK = 1 | ")


def test_repack_is_turned_off_only_where_llama_cpp_uses_its_amx_kernels():
    why = worker["repack_off_reason"](AMX_BUILD)
    assert why is not None and "--no-repack" in why and "ggml-org/llama.cpp#20824" in why
    assert worker["repack_off_reason"](AVX2_BUILD) is None
    assert worker["repack_off_reason"](AMX_BUILD.replace("AMX_INT8 = 1", "AMX_INT8 = 0")) is None
