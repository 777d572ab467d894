"""The export formats, named once: where each exporter lives, what it needs, and how much it writes.

Every other place that knows a format (``--format`` parsing, the order of the exporters, the free-space
estimate, the GGUF converter's ``--outtype``, the tolerance rows) reads :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from bake.errors import BakeError


class Format(str, Enum):
    HF = "hf"
    ONNX = "onnx"
    GGUF = "gguf"  # float32
    GGUF_F16 = "gguf-f16"
    GGUF_BF16 = "gguf-bf16"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q4_K_M = "gguf-q4_k_m"  # k-quants: llama.cpp's own quantiser on the verified f32 GGUF file
    GGUF_Q5_K_M = "gguf-q5_k_m"
    GGUF_Q6_K = "gguf-q6_k"


@dataclass(frozen=True)
class FormatSpec:
    module: str                      # importing it registers the exporter (optional dependencies load only then)
    install: str = ""                # how to get those dependencies ("" when they come with the package)
    needs: tuple[Format, ...] = ()   # formats whose written, verified output this one reads: exported first
    dtype: str | None = None         # the only --dtype it accepts (None: any)
    bytes_per_param: float = 0.0     # what it adds to the export, per parameter (hf: the export dtype's size)
    gguf_outtype: str | None = None  # llama.cpp converter --outtype
    llama_ftype: str | None = None   # llama.cpp quantiser type (LLAMA_FTYPE_MOSTLY_<this>), from the f32 GGUF


_GGUF = "make setup-gguf (see docs: GGUF)"
FORMATS: dict[Format, FormatSpec] = {
    Format.HF: FormatSpec(module="bake.formats.export"),
    Format.ONNX: FormatSpec(module="bake.formats.onnx", install="pip install 'lineas-bake[onnx]'",
                            bytes_per_param=4.0),  # the graph is exported and checked in float32
    # GGUF converts the verified float32 HF export of the same run (the converter's --outtype sets the precision).
    Format.GGUF: FormatSpec(module="bake.formats.gguf", install=_GGUF, needs=(Format.HF,), dtype="float32",
                            bytes_per_param=4.0, gguf_outtype="f32"),
    Format.GGUF_F16: FormatSpec(module="bake.formats.gguf", install=_GGUF, needs=(Format.HF,), dtype="float32",
                                bytes_per_param=2.0, gguf_outtype="f16"),
    Format.GGUF_BF16: FormatSpec(module="bake.formats.gguf", install=_GGUF, needs=(Format.HF,), dtype="float32",
                                 bytes_per_param=2.0, gguf_outtype="bf16"),
    Format.GGUF_Q8_0: FormatSpec(module="bake.formats.gguf", install=_GGUF, needs=(Format.HF,), dtype="float32",
                                 bytes_per_param=34 / 32, gguf_outtype="q8_0"),  # 34 bytes per block of 32
    # k-quants: llama.cpp's quantiser on the verified f32 GGUF file of the same run (bake.formats.gguf_quant).  Bytes:
    # at most the bits per weight llama.cpp wrote for SmolLM2-135M, whose rows of 576 are no multiple of 256, so
    # most tensors fell back to Q5_0 / Q5_1 / Q8_0 (6.17, 6.56, 8.12 bits); rows of 256k: Q4_K_M ~4.9, Q6_K 6.56.
    Format.GGUF_Q4_K_M: FormatSpec(module="bake.formats.gguf_quant", install=_GGUF, needs=(Format.HF, Format.GGUF),
                                   dtype="float32", bytes_per_param=6.5 / 8, llama_ftype="Q4_K_M"),
    Format.GGUF_Q5_K_M: FormatSpec(module="bake.formats.gguf_quant", install=_GGUF, needs=(Format.HF, Format.GGUF),
                                   dtype="float32", bytes_per_param=7.0 / 8, llama_ftype="Q5_K_M"),
    Format.GGUF_Q6_K: FormatSpec(module="bake.formats.gguf_quant", install=_GGUF, needs=(Format.HF, Format.GGUF),
                                 dtype="float32", bytes_per_param=8.5 / 8, llama_ftype="Q6_K"),
}
GGUF_FORMATS = tuple(f for f, s in FORMATS.items() if s.gguf_outtype is not None)
GGUF_QUANT_FORMATS = tuple(f for f, s in FORMATS.items() if s.llama_ftype is not None)
SPACE_MARGIN = 1.05  # headroom over the estimate (file headers, index, card, fs rounding)


class FormatRequestError(BakeError, ValueError):
    """Formats that cannot be exported together as asked (a format without the one it needs, a wrong dtype)."""


def spec(name: str) -> FormatSpec | None:
    """The spec of a built-in format, None for one an extension registered."""
    try:
        return FORMATS[Format(name)]
    except ValueError:
        return None


def check_request(formats: Sequence[str], dtype: str) -> None:
    """Refuse, before any work, formats whose needs are not asked for or whose dtype is not the one given."""
    for name in formats:
        s = spec(name)
        if s is None:
            continue
        missing = [n.value for n in s.needs if n.value not in formats]
        if missing:
            what = ("quantises the verified f32 GGUF file of the same export (llama.cpp's quantiser)" if s.llama_ftype
                    else f"converts the verified {', '.join(missing)} export")
            raise FormatRequestError(f"--format {name} {what}: add {', '.join(missing)} "
                                     f"(--format {','.join([*missing, *formats])})")
        if s.dtype is not None and dtype != s.dtype:
            raise FormatRequestError(f"--format {name} converts the {s.dtype} HF export (the converter's "
                                     f"--outtype sets the GGUF precision), got --dtype {dtype}")


def export_order(formats: Iterable[str]) -> list[str]:
    """``formats`` with every format after the ones it needs (otherwise in the order given)."""
    todo, done = list(formats), []
    while todo:
        ready = next(f for f in todo if all(n.value in done or n.value not in todo
                                            for n in (spec(f).needs if spec(f) else ())))
        todo.remove(ready)
        done.append(ready)
    return done


def export_bytes(n_params: int, dtype_bytes: int, formats: Iterable[str] = ("hf",)) -> int:
    """Estimated size of an export: every parameter once in the export dtype, plus what each other
    format writes (:attr:`FormatSpec.bytes_per_param`: ONNX an fp32 copy, each GGUF file one in its type)."""
    total = n_params * dtype_bytes
    total += sum(n_params * s.bytes_per_param for f in dict.fromkeys(formats) if (s := spec(f)) is not None)
    return int(total * SPACE_MARGIN)
