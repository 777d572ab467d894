"""``lineas-bake --model path/to/model-Q4_K_M.gguf``: steer a (quantised) GGUF file in place (issue 27).

Writes ``<out>/<same file name>.gguf``: every quantised tensor byte for byte, the folded F32 norms and the new or
updated F32 biases, the source's metadata plus a ``lineas.*`` record (a second bake of the same maps is refused
as for HF exports); the card, provenance and verification files beside it.  Nothing is written unless it
verifies, and the source file is only ever read.

The steps, each reusing the shared machinery:

1. the file as a lazy store (:class:`bake.store.gguf_file.GGUFStore`) and an HF skeleton on the meta device from
   the config transformers reads out of the file's metadata (``AutoConfig`` with ``gguf_file=``), so maps and
   sites are named as for the HF model;
2. the maps checks and the re-bake / model-match rules (:mod:`bake.plan.history`) against the file's record;
3. the plan (:func:`bake.plan.planner.plan`) with llama.cpp required: the runtime matrix decides which biases
   llama.cpp loads, and a shift with nowhere to go is refused with the way out (``lineas-train
   --require-runtime llama.cpp``), never dropped; then what the file itself can take in place
   (:func:`bake.formats.gguf_inplace.planned_writes`);
4. the fold (:func:`bake.formats.gguf_inplace.fold_into_gguf`) and the new file, written into a temporary folder
   beside ``--out`` and moved into place only once verified (:mod:`bake.publish.outdir`);
5. the checks in llama.cpp (:mod:`bake.formats.gguf_inplace_check`).
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from bake.errors import VerificationError
from bake.families.gguf_card import gguf_card, gguf_provenance
from bake.formats.gguf_inplace import fold_into_gguf, lineas_metadata, planned_writes, write_gguf
from bake.formats.gguf_inplace_check import (
    affines_of,
    dequantised_source,
    exact_check,
    quantised_checks,
    unsteered_reference,
)
from bake.plan.check import site_names
from bake.plan.history import (
    EarlierBake,
    check_model_match,
    check_rebake,
    maps_records,
    new_entry,
    recorded_bakes,
    warn_stacked_sites,
)
from bake.plan.inputs import combined, normalise_maps
from bake.plan.planner import FoldPlan, ShiftFold
from bake.plan.planner import plan as make_plan
from bake.plan.runtimes import Runtime
from bake.publish.card import seal, write_verification
from bake.publish.outdir import OutputPathError, check_out_dir, move_into_place, sigterm_raises, temp_folder
from bake.registry.llm import load_registry
from bake.store.gguf_file import GGUFFileError, GGUFStore
from bake.verify.check import VerificationReport, record_reference
from lineas.provenance import config_fingerprint

log = logging.getLogger(__name__)

SCRATCH_NAME = ".lineas-scratch-f32.gguf"  # the exact check's F32 copy, inside the temporary folder


def is_gguf_file(model) -> bool:
    """Whether ``--model`` names a GGUF file (bakes in place, this module)."""
    p = Path(str(model)).expanduser()
    return p.suffix.lower() == ".gguf" and p.is_file()


@dataclass
class GGUFBake:
    """What a GGUF bake decided and, once run, wrote."""

    source: Path
    store: GGUFStore
    skeleton: torch.nn.Module
    sources: list
    maps: dict
    plan: FoldPlan
    earlier: list[dict]
    writes: list[tuple[str, str, bool]]
    report: VerificationReport | None = None
    folder: Path | None = None
    file: Path | None = None
    written: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def writes_table(self) -> str:
        lines = [f"GGUF tensors written in place ({self.store.architecture}, {self.source.name}):"]
        lines += [f"  {name}{' (new, F32)' if new else ' (F32)'}: {what}" for name, what, new in self.writes]
        n_q = sum(1 for i in self.store.tensors.values() if i.quantised)
        lines.append(f"  every other tensor ({len(self.store.tensors)} in the file, {n_q} quantised) copied byte "
                     "for byte")
        return "\n".join(lines)


def _skeleton(path: Path):
    """The HF model of the file's metadata, on the meta device (no weight read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError for architectures it lacks
        raise GGUFFileError(f"transformers cannot read a config from {path} ({type(e).__name__}: {e}); the maps "
                            "are named after the HF model, so the file must be one transformers' GGUF loader "
                            "knows") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    # as the checkpoint transformers would save from this file (same fingerprint as maps learned on it)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def _earlier(store: GGUFStore) -> list[EarlierBake]:
    entries = recorded_bakes(SimpleNamespace(lineas_baked=store.earlier_bakes()))  # the HF record's validation
    return [EarlierBake(e, f"{store.path.name} metadata lineas.bakes[{i}]") for i, e in enumerate(entries)]


def plan_gguf(model, maps, strength: float = 1.0, *, allow_rebake: bool = False,
              ignore_model_mismatch: bool = False) -> GGUFBake:
    """Everything up to the plan (what ``--dry-run`` prints); reads no tensor data."""
    path = Path(str(model)).expanduser()
    store = GGUFStore(path)
    skeleton = _skeleton(path)
    sources = normalise_maps(maps, strength, known_sites=site_names(skeleton))
    eff = combined(sources)
    earlier = _earlier(store)
    config = skeleton.config
    check_model_match(config, sources, earlier, path.name, ignore=ignore_model_mismatch)
    fold_plan = make_plan(skeleton, eff, require_runtimes=(Runtime.LLAMA_CPP,))
    check_rebake(earlier, sources, fold_plan.maps_digest, allow=allow_rebake)
    warn_stacked_sites(earlier, eff)
    fact = load_registry()[fold_plan.registry].runtimes[Runtime.LLAMA_CPP]  # check_required made sure of both
    if fact.architecture != store.architecture:
        raise GGUFFileError(f"{path.name} is llama.cpp architecture {store.architecture!r}, but the registry's "
                            f"llama.cpp facts for {fold_plan.registry!r} are about {fact.architecture!r}: which "
                            "biases llama.cpp loads is not known for this file")
    writes = planned_writes(store, fold_plan)
    entry = new_entry(config, effective_digest=fold_plan.maps_digest, sites=list(eff),
                      shift_in_consumers=[p.site for p in fold_plan.sites if p.shift is ShiftFold.CONSUMERS],
                      maps=maps_records(sources))
    entry["gguf_source"] = {"file": path.name, "sha256_of_config": config_fingerprint(config)}
    return GGUFBake(path, store, skeleton, sources, eff, fold_plan, [e.entry for e in earlier] + [entry], writes)


def _check_out(bake: GGUFBake, out, overwrite: bool, verify: bool) -> Path:
    src = bake.source.resolve()
    full = Path(out).expanduser().resolve()
    if full == src.parent or full in src.parents:
        raise OutputPathError(f"--out {str(out)!r} is or contains the folder of {bake.source.name}; the bake writes "
                              "a new file and never touches the source: give a new folder")
    scratch = sum(4 * _numel(i.shape) for i in bake.store.tensors.values()) if verify else 0
    return check_out_dir(out, overwrite, needed_bytes=src.stat().st_size + scratch)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def bake_gguf(model, maps, strength: float = 1.0, *, out, overwrite: bool = False, verify: bool = True,
              verify_tokens: int = 8, allow_rebake: bool = False, ignore_model_mismatch: bool = False,
              command: str = "", progress: bool | None = False) -> GGUFBake:
    """Bake ``maps`` into the GGUF file ``model``, verify in llama.cpp, write ``out/<file name>`` with its card,
    provenance and verification report.  Raises ``VerificationError`` (nothing written) when a gating check
    fails, ``GGUFFileError``/``FoldError``/``RebakeError`` (bad input, exit 2) before any work."""
    if verify_tokens < 1:
        raise ValueError(f"verify_tokens must be >= 1, got {verify_tokens}")
    bake = plan_gguf(model, maps, strength, allow_rebake=allow_rebake, ignore_model_mismatch=ignore_model_mismatch)
    out_dir = _check_out(bake, out, overwrite, verify)
    ref = unsteered = None
    if verify:
        hf, tok = dequantised_source(bake.source)
        ref = record_reference(hf, affines_of(bake.maps), tokenizer=tok, n_tokens=verify_tokens, progress=progress)
        unsteered = unsteered_reference(hf, ref)
        del hf
        gc.collect()
    fold = fold_into_gguf(bake.store, bake.plan, bake.maps)
    with sigterm_raises():
        tmp = temp_folder(out_dir)
        try:
            target = tmp / bake.source.name
            bake.written = write_gguf(bake.store, fold, target, metadata=lineas_metadata(bake.earlier))
            bake.report = VerificationReport(skipped=True)
            if verify:
                bake.report = _verify(bake, target, tmp / SCRATCH_NAME, ref, unsteered, progress)
            else:
                log.warning("verification skipped: the baked file was NOT compared with the hooked model")
            write_verification(tmp, bake.report)
            (tmp / "README.md").write_text(gguf_card(bake, command), encoding="utf-8")
            seal(tmp, gguf_provenance(bake, command))
            move_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    bake.folder, bake.file = out_dir, out_dir / bake.source.name
    return bake


def _verify(bake: GGUFBake, target: Path, scratch: Path, ref, unsteered, progress) -> VerificationReport:
    report = VerificationReport.for_reference(ref)
    exact, bake.details["exact"] = exact_check(target, scratch, ref, progress=progress)
    report.add(exact)
    if exact.passed:  # the quantised rows only mean something once the fold is known to be right
        base, steered, bake.details["quantised"] = quantised_checks(bake.source, target, ref, unsteered,
                                                                    progress=progress)
        report.add(base)
        report.add(steered)
    same = [n for n, how in bake.written.items() if how == "copied"]
    bake.details["bytes_identical"] = _identical(bake.store, GGUFStore(target), same)
    if not report.passed:
        err = VerificationError("the GGUF file baked in place does not reproduce the hooked model: "
                                + "; ".join(report.failures), report=report)
        err.plan = bake.plan
        raise err
    return report


def _identical(src: GGUFStore, dst: GGUFStore, names: list[str]) -> dict:
    """Every copied tensor's bytes and type, read back from the written file."""
    bad = [n for n in names if dst.info(n).type_name != src.info(n).type_name
           or any(a != b for a, b in zip(src.raw_chunks(n), dst.raw_chunks(n)))]
    if bad:
        raise VerificationError(f"{len(bad)} copied tensor(s) differ from the source file: {', '.join(bad[:4])}")
    return {"tensors": len(names), "identical": len(names)}
