"""The base model's side of a k-quant pair: the unsteered checkpoint converted and quantised as the steered file
was, run in llama.cpp, and compared with the base model itself.

A k-quant file cannot reproduce the hooked model: quantisation moves the logits of any model.  So its check
against the hooked model (:mod:`bake.formats.gguf_quant`) is read next to this one, the base model's file of the
same type against the base model, same probes, same greedy prompts, same tolerance row.  Close numbers say the
steering survived the quantisation; the steered pair much worse than the base pair says it did not.

For :func:`bake.api.bake_folder` (what ``lineas-bake`` runs) the base model is the source checkpoint
(``baked.source``): llama.cpp's converter writes its f32 GGUF file into a scratch folder in the temporary directory
(``TMPDIR``; never inside the export, removed afterwards), llama.cpp's quantiser makes each requested type of it,
and the reference is the checkpoint in torch float32 without hooks (loaded with bounded memory as the hooked
reference was), its logits on the probes and its greedy tokens.  An in-memory :func:`bake.api.bake` folded the base
weights in place: its pair is reported as not measured, with the reason, never approximated.

The base side is measured once per export for every k-quant type asked for (one conversion, one reference), at
the first k-quant format; the others take their result from :data:`_MEASURED`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from bake.errors import BakeError
from bake.formats.baked import Baked
from bake.formats.base import ExportOptions
from bake.formats.gguf import CONVERTER_PACKAGE, convert
from bake.formats.gguf_quantise import FTYPES, quantise, tensor_types
from bake.formats.kinds import SPACE_MARGIN, spec
from bake.formats.llamacpp import llamacpp_runner, load_llamacpp
from bake.verify.check import CheckResult, Reference, compare
from bake.verify.passes import greedy_tokens, run_grouped, torch_runner
from bake.verify.tolerances import gguf_row
from lineas.io import human_size

log = logging.getLogger(__name__)

IN_MEMORY = ("an in-memory bake (bake.api.bake) folds the base weights in place, so no unsteered model is left "
             "to convert and run; bake the checkpoint folder (lineas-bake --model <folder>, bake.api.bake_folder) "
             "to measure it")
REFERENCE = "base model (the source checkpoint without hooks), torch float32, on the same probes and greedy prompts"
# per (export folder, format): the base side measured at the first k-quant format of that export
_MEASURED: dict[tuple[str, str], tuple[CheckResult | None, dict]] = {}


def steered_label(outtype: str) -> str:
    return f"gguf {outtype} (llama.cpp): steered file vs hooked model"


def base_label(outtype: str) -> str:
    return f"gguf {outtype} (llama.cpp): base model's file vs base model"


def pair_summary(check: CheckResult) -> dict:
    """The numbers of one side of a pair, for the GGUF report."""
    return {"measured": True, "label": check.label, "top1": check.top1, "mean_kl": check.mean_kl,
            "max_rel": check.max_rel, "max_abs": check.max_abs, "greedy_identical": check.greedy_matched,
            "greedy_prompts": check.greedy_total, "within_row": check.passed}


def not_measured(reason: str) -> tuple[None, dict]:
    return None, {"measured": False, "reason": reason}


def base_pair(baked: Baked, folder: Path, fmt: str, opts: ExportOptions) -> tuple[CheckResult | None, dict]:
    """The base model's check for k-quant ``fmt`` (None when not measured) and its entry in the GGUF report."""
    key = (str(folder), fmt)
    if key not in _MEASURED:
        for old in [k for k in _MEASURED if k[0] != key[0]]:  # left by an export that failed before using them
            del _MEASURED[old]
        todo = [f for f in dict.fromkeys([fmt, *opts.formats]) if f in FTYPES and (key[0], f) not in _MEASURED]
        for f, got in zip(todo, measure_base(baked, todo, opts)):
            _MEASURED[(key[0], f)] = got
    return _MEASURED.pop(key)


def measure_base(baked: Baked, fmts: list[str], opts: ExportOptions) -> list[tuple[CheckResult | None, dict]]:
    """The base side of every format in ``fmts`` (see the module docstring)."""
    if baked.source is None:
        return [not_measured(IN_MEMORY) for _ in fmts]
    source = Path(baked.source.store.folder.folder)
    n = sum(p.numel() for p in baked.model.parameters())
    need = int(n * (4 + max(spec(f).bytes_per_param for f in fmts)) * SPACE_MARGIN)  # f32 file + one quantised
    scratch_in = Path(tempfile.gettempdir())
    free = shutil.disk_usage(scratch_in).free
    if free < need:
        why = (f"the base model's scratch GGUF files need {human_size(need)} in {scratch_in} and {human_size(free)} "
               "are free there; set TMPDIR to a folder with room")
        log.warning("gguf k-quants: base model not measured: %s", why)
        return [not_measured(why) for _ in fmts]
    ref = base_reference(baked)
    out = []
    with tempfile.TemporaryDirectory(prefix="lineas_gguf_base_") as scratch:
        f32 = Path(scratch) / "base-f32.gguf"
        try:
            convert(source, f32, "f32", progress=opts.progress)
        except BakeError as e:
            log.warning("gguf k-quants: base model not measured: %s", e)
            return [not_measured(f"llama.cpp's converter failed on the base checkpoint {source}: {e}") for _ in fmts]
        for fmt in fmts:
            out.append(_measure_one(f32, Path(scratch), fmt, ref, source, opts))
    return out


def _measure_one(f32: Path, scratch: Path, fmt: str, ref: Reference, source: Path,
                 opts: ExportOptions) -> tuple[CheckResult | None, dict]:
    outtype = FTYPES[fmt].lower()
    path = scratch / f"base-{outtype}.gguf"
    try:
        made = quantise(f32, path, FTYPES[fmt], progress=opts.progress)
        types = tensor_types(path)
        with load_llamacpp(path) as llm:
            check, _ = compare(llamacpp_runner(llm), ref, gguf_row(outtype), label=base_label(outtype),
                               progress=opts.progress)
    except BakeError as e:  # the advisory side only: the steered file's own check stands
        log.warning("gguf %s: base model not measured: %s", outtype, e)
        return not_measured(f"the base model's {outtype} file could not be made or run: {e}")
    finally:
        path.unlink(missing_ok=True)
    return check, {**pair_summary(check), "reference": REFERENCE, "base_checkpoint": str(source),
                   "converter": CONVERTER_PACKAGE, "fallbacks": made["fallbacks"], "tensor_types": types}


@torch.no_grad()
def base_reference(baked: Baked) -> Reference:
    """The base model's logits on the hooked reference's probes and its greedy tokens on the same prompts: the
    source checkpoint loaded with bounded memory (as :func:`bake.formats.gguf_greedy.hooked_greedy` loads it),
    without hooks."""
    from bake.store.checkpoint import load_bounded

    hooked, src = baked.reference, baked.source
    vocab = hooked.logits[0].shape[-1]
    with load_bounded(src.store.folder.folder, device=src.device, max_memory=src.max_memory,
                      trust_remote_code=src.trust_remote_code) as model:
        run = torch_runner(model)
        logits, _ = run_grouped(run, [(p.input_ids, p.attention_mask) for p in hooked.probes], vocab)
        greedy = greedy_tokens(run, hooked.greedy_prompts, hooked.n_tokens)
        del model, run  # the last references: load_bounded frees it
    return Reference(hooked.probes, logits, hooked.greedy_prompts, greedy, hooked.n_tokens, [], {}, hooked.diag_probe)
