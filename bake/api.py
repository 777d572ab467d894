"""The Python API, mirroring ``lineas-bake``.  Two entry points, one engine:

* :func:`bake_folder` (what ``lineas-bake`` runs on a local checkpoint): memory that does
  not grow with the model.  Plan on a skeleton on the meta device, fold the touched tensors
  read from the shards, record the hooked reference with at most ``max_memory`` bytes of
  weights resident; ``save_pretrained`` then writes the shards one by one and verifies the
  written export against the reference::

      baked = bake_folder("./gemma-2-2b", "tox.safetensors", strength=1.0)
      baked.save_pretrained("gemma-2-2b-detox")   # raises VerificationError, writes nothing, if it differs

* :func:`bake`: an ``nn.Module`` (or a name loaded in float32) folded in memory and verified
  at once; ``baked.model`` is the baked model, ready to use.

Order of work (all in float32): plan (nothing modified) -> record the hooked
reference (original weights + hooks, hooks removed afterwards) -> fold -> compare
with the reference.  The reference is recorded *before* the fold from the untouched
weights, so it never sees a folded tensor, and no second copy of the model is held.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bake.errors import BakeError, VerificationError
from bake.families.causal_lm import CAUSAL_LM
from bake.families.detect import detect
from bake.fold.execute import apply_plan, check_applicable, commit_plan
from bake.plan.check import site_names
from bake.plan.history import (
    BAKED_KEY,
    check_model_match,
    check_rebake,
    earlier_bakes,
    legacy_entries,
    maps_records,
    recorded_bakes,
    warn_stacked_sites,
)
from bake.plan.inputs import combined, normalise_maps
from bake.plan.planner import FoldPlan, maps_digest
from bake.plan.planner import plan as make_plan
from bake.results import BakedModel, BaseModel, StreamSource
from bake.store.checkpoint import (
    check_whole_model_fits,
    device_map_for,
    load_bounded,
    load_config,
    load_skeleton,
    safetensors_folder,
)
from bake.store.shards import ShardFolder
from bake.store.stores import FolderStore
from bake.verify.check import (
    VerificationReport,
    bar_disabled,
    compare,
    site_divergence,
)
from lineas.models import (
    check_device,
    display_name,
    load_model,
    load_tokenizer,
    local_checkpoint,
    refuse_quantized,
)
from lineas.provenance import config_fingerprint

log = logging.getLogger(__name__)
IN_MEMORY_COPIES = 2.0  # the float32 model and, while its export is checked, the reloaded copy


def _local_path(model, *, trust_remote_code: bool, shards: bool = True) -> str:
    """``model`` (a folder, an alias or a Hub id) as a local folder (a Hub id fetched into the Hugging Face
    cache: :func:`lineas.models.local_checkpoint`); a diffusers pipeline belongs to the pipeline family
    (bake.families.diffusers.bake), not to this API."""
    path = local_checkpoint(str(model), trust_remote_code=trust_remote_code, shards=shards)
    if detect(path) is not CAUSAL_LM:
        raise NotAFolderError(f"{str(model)!r} is a diffusers pipeline (model_index.json); bake it with "
                              f"bake.bake_pipeline({str(model)!r}, maps, out=...) or lineas-bake --model")
    return path


def _resolve_model(model, *, tokenizer, device: str, trust_remote_code: bool, copy_model: bool, progress: bool,
                   with_tokenizer: bool = True):
    check_device(device)
    if isinstance(model, nn.Module):
        if getattr(model, "config", None) is not None:
            refuse_quantized(model.config, type(model).__name__)
        if copy_model:
            model = copy.deepcopy(model)
        model = model.to(device=device, dtype=torch.float32).eval()
        cfg = getattr(model, "config", None)
        path = str(getattr(cfg, "_name_or_path", "") or "")
        name = path or type(model).__name__
        base = BaseModel(name, path, display_name(name) if path else name,
                         config_fingerprint(cfg) if cfg is not None else "")
        return model, tokenizer, base
    local = safetensors_folder(_local_path(model, trust_remote_code=trust_remote_code))
    if local is not None:  # its config is at hand: refuse a model this machine cannot hold, before loading it
        check_whole_model_fits(load_skeleton(local, trust_remote_code=trust_remote_code),
                               step=f"bake({str(model)!r}) (in memory; bake_folder() bakes out of core)",
                               copies=IN_MEMORY_COPIES)
    with tqdm(total=2, desc=f"load {model}", disable=bar_disabled(progress), leave=False) as bar:
        # A Hub id is read from its fetched folder; without safetensors weights transformers fetches the rest.
        loaded = load_model(str(local or model), device=device, dtype="float32", trust_remote_code=trust_remote_code,
                            with_tokenizer=False, allow_quantized=False)
        bar.update()
        tok = tokenizer
        if tok is None and with_tokenizer:
            tok = load_tokenizer(loaded.path, trust_remote_code=trust_remote_code)
        bar.update()
    base = BaseModel(str(model), loaded.path, display_name(str(model)), config_fingerprint(loaded.model.config))
    return loaded.model, tok, base


def _check_history(module: nn.Module, sources, eff, base: BaseModel, *, allow_rebake: bool,
                   ignore_model_mismatch: bool) -> list[dict]:
    """Refuse maps learned on another model and maps already baked in; returns the earlier bakes known only
    from a provenance file (to be carried into the config record)."""
    config = getattr(module, "config", None)
    earlier = earlier_bakes(config, base.path)
    check_model_match(config, sources, earlier, base.display, ignore=ignore_model_mismatch)
    check_rebake(earlier, sources, maps_digest(eff), allow=allow_rebake)
    warn_stacked_sites(earlier, eff)
    return legacy_entries(config, earlier)


def plan_bake(model, maps, strength: float = 1.0, *, require_standard: bool = False, untie: bool = False,
              device: str = "cpu", trust_remote_code: bool = False, progress: bool = False,
              allow_rebake: bool = False, ignore_model_mismatch: bool = False, require_runtimes=()) -> FoldPlan:
    """Only the plan (what ``--dry-run`` prints), after the same input checks as :func:`bake`; nothing is modified."""
    sources = normalise_maps(maps, strength, known_sites=_sites_known_now(model))
    module, _, base = _resolve_model(model, tokenizer=None, device=device, trust_remote_code=trust_remote_code,
                                     copy_model=False, progress=progress, with_tokenizer=False)
    eff = combined(sources)
    _check_history(module, sources, eff, base, allow_rebake=allow_rebake, ignore_model_mismatch=ignore_model_mismatch)
    return make_plan(module, eff, require_standard=require_standard, untie=untie, require_runtimes=require_runtimes)


def bake(model, maps, strength: float = 1.0, *, tokenizer=None, require_standard: bool = False,
         untie: bool = False, verify: bool = True, verify_tokens: int = 8, device: str = "cpu",
         trust_remote_code: bool = False, copy_model: bool = True, progress: bool = False,
         allow_rebake: bool = False, ignore_model_mismatch: bool = False, require_runtimes=()) -> BakedModel:
    """Fold steering maps into a model's weights and verify the result.

    ``model``: a name/alias/path (loaded in float32) or an ``nn.Module`` (deep-copied
    unless ``copy_model=False``, then cast to float32).  ``maps``: a path, a
    ``SteeringMaps``, or a list of ``(maps, strength)`` pairs composed in order
    (bare entries get ``strength``).  Raises ``FoldError``/``MapsFormatError`` on bad
    input and ``VerificationError`` (with ``.report``) when the baked model does
    not reproduce the hooked one.  With verification, maps that make the hooked model non-finite, all zero or
    constant, or that change no probe by more than the check's limit, raise a ``FoldError``
    (:mod:`bake.verify.guard`).  ``verify=False`` skips the comparison (dangerous).
    Maps already baked into the model (its config's ``lineas_baked`` record, or the
    ``lineas_provenance.json`` of its folder) raise ``RebakeError`` unless ``allow_rebake``;
    maps learned on another ``model_type``/``config_sha256`` raise ``ModelMismatchError``
    unless ``ignore_model_mismatch`` (then a warning is logged).
    ``require_runtimes``: :class:`bake.plan.runtimes.Runtime` values that must load the export without custom code;
    a plan they cannot serve raises ``FoldError`` before any work (see :mod:`bake.plan.runtimes`).
    """
    if verify_tokens < 1:
        raise ValueError(f"verify_tokens must be >= 1, got {verify_tokens}")
    sources = normalise_maps(maps, strength, known_sites=_sites_known_now(model))
    eff = combined(sources)
    module, tok, base = _resolve_model(model, tokenizer=tokenizer, device=device,
                                       trust_remote_code=trust_remote_code, copy_model=copy_model,
                                       progress=progress)
    legacy = _check_history(module, sources, eff, base, allow_rebake=allow_rebake,
                            ignore_model_mismatch=ignore_model_mismatch)
    fold_plan = make_plan(module, eff, require_standard=require_standard, untie=untie,
                          require_runtimes=require_runtimes)
    reference = None
    if verify:
        reference = CAUSAL_LM.reference(module, {s: (m.scale, m.shift) for s, m in eff.items()}, tokenizer=tok,
                                        n_tokens=verify_tokens, progress=progress, source=base.path or None)
    base_absmax = _absmax_before_fold(module, fold_plan)
    apply_plan(module, fold_plan, eff, allow_rebake=allow_rebake, maps_record=maps_records(sources))
    if legacy:  # an export from before the config record: keep its bake in the record too
        setattr(module.config, BAKED_KEY, legacy + recorded_bakes(module.config))
    if reference is None:
        log.warning("verification skipped: the baked model was NOT compared with the hooked model")
        report = VerificationReport(skipped=True)
    else:
        report = VerificationReport.for_reference(reference)
        check, acts = compare(module, reference, "torch-float32", label="baked float32 (in memory)",
                              progress=progress)
        report.add(check)
        report.sites = site_divergence(reference, acts, eff, fold_plan.differs_by_design())
        if not report.passed:
            err = VerificationError("baked model does not reproduce the hooked model: " + "; ".join(report.failures),
                                    report=report)
            err.plan = fold_plan
            raise err
    return BakedModel(module, tok, fold_plan, report, sources, base, eff, reference, base_absmax=base_absmax)


# ----------------------------------------------------------------------------- the out-of-core path
class NotAFolderError(BakeError, ValueError):
    """bake_folder() was given something that is not a local safetensors checkpoint folder."""


def _sites_known_now(model) -> frozenset[str] | None:
    """The sites of a model given in memory (checked against a maps file's header before its tensors are
    read); None for a path, whose modules are known only once it is loaded."""
    return site_names(model) if isinstance(model, nn.Module) else None


def _absmax_before_fold(module: nn.Module, fold_plan: FoldPlan) -> dict[str, float]:
    """Max |value| of every existing tensor the plan will write, read before the fold changes it."""
    params = dict(module.named_parameters())
    written = {t for p in fold_plan.sites for step in p.steps for t in step.tensors if t in params}
    with torch.no_grad():
        return {t: float(params[t].detach().abs().max()) for t in sorted(written) if params[t].numel()}


def _open_folder(model, *, trust_remote_code: bool, shards: bool = True) -> tuple[nn.Module, Path, BaseModel]:
    """The skeleton, the safetensors folder and the provenance of ``model``; ``shards=False``: a Hub id's
    weight shards are not fetched (its plan needs only the config)."""
    folder = safetensors_folder(_local_path(model, trust_remote_code=trust_remote_code, shards=shards))
    if folder is None:
        raise NotAFolderError(f"{model!r} has no safetensors weights (model.safetensors or an index); "
                              "bake it with bake(), which loads it whole with transformers")
    config = load_config(folder, trust_remote_code=trust_remote_code)
    refuse_quantized(config, str(model))
    skeleton = load_skeleton(folder, trust_remote_code=trust_remote_code, config=config)
    base = BaseModel(str(model), str(folder), display_name(str(model)), config_fingerprint(config))
    return skeleton, folder, base


def bake_folder(model, maps, strength: float = 1.0, *, require_standard: bool = False, untie: bool = False,
                verify: bool = True, verify_tokens: int = 8, device: str = "cpu", trust_remote_code: bool = False,
                progress: bool | None = False, allow_rebake: bool = False, ignore_model_mismatch: bool = False,
                max_memory: int | None = None, plan_only: bool = False, require_runtimes=()) -> BakedModel | FoldPlan:
    """Bake a checkpoint folder, an alias or a Hub id (its files fetched into the Hugging Face cache
    first) with memory that does not grow with the model.

    Same checks and errors as :func:`bake`.  Returns a :class:`BakedModel` whose ``model`` is a
    skeleton on the meta device with the baked structure and config; its ``save_pretrained``
    records the hooked reference while it writes the export shard by shard from the source
    folder, then verifies the *written* export against it (``VerificationError``, or
    the guard's ``FoldError`` for maps that overflow, erase or do not visibly change the hooked model
    (:mod:`bake.verify.guard`), and nothing written).
    ``max_memory``: bytes of weights in memory while verifying, the block being read included (None:
    the largest block plus 512 MiB, :func:`bake.store.checkpoint.default_max_memory`); the rest is read per block.
    ``plan_only``: return the plan (what ``--dry-run`` prints); reads no weight unless a site's
    output size can only be measured by running the model.
    """
    if verify_tokens < 1:
        raise ValueError(f"verify_tokens must be >= 1, got {verify_tokens}")
    check_device(device)
    local = not isinstance(model, nn.Module) and Path(str(model)).expanduser().is_dir()
    if local:  # the skeleton costs nothing here: the maps' sites are checked before their tensors are read
        skeleton, path, base = _open_folder(model, trust_remote_code=trust_remote_code, shards=not plan_only)
    sources = normalise_maps(maps, strength, known_sites=site_names(skeleton) if local else None)
    eff = combined(sources)
    if not local:  # a Hub id is fetched only once the maps are known to be sound
        skeleton, path, base = _open_folder(model, trust_remote_code=trust_remote_code, shards=not plan_only)
    if verify and max_memory is not None:
        device_map_for(skeleton, torch.device(device), max_memory)  # a budget too small fails now, not mid-export

    def runnable():  # only for a site whose output size only a run tells: a Hub id's dry run fetches its shards now
        weights = local_checkpoint(str(model), trust_remote_code=trust_remote_code) if plan_only else path
        return load_bounded(weights, device=device, max_memory=max_memory, trust_remote_code=trust_remote_code)

    legacy = _check_history(skeleton, sources, eff, base, allow_rebake=allow_rebake,
                            ignore_model_mismatch=ignore_model_mismatch)
    fold_plan = make_plan(skeleton, eff, require_standard=require_standard, untie=untie, runnable=runnable,
                          require_runtimes=require_runtimes)
    if plan_only:
        return fold_plan
    eff_maps = check_applicable(skeleton, fold_plan, eff, allow_rebake=allow_rebake, maps_record=maps_records(sources))
    folder = ShardFolder(path)
    store = FolderStore.of(skeleton, folder)  # keys renamed as from_pretrained renames them
    tok = load_tokenizer(str(folder.folder), trust_remote_code=trust_remote_code)
    # The skeleton takes the baked structure and config; the folded values are computed by the exporter,
    # in the export's dtype (a value that overflows it fails there, before any slow step).
    commit_plan(skeleton, fold_plan, eff_maps, {}, maps_record=maps_records(sources))
    if legacy:
        setattr(skeleton.config, BAKED_KEY, legacy + recorded_bakes(skeleton.config))
    if not verify:
        log.warning("verification skipped: the baked model will NOT be compared with the hooked model")
    # The hooked reference is recorded by save_pretrained, while the shards are written (see
    # bake.formats.hf_stream): the two take about as long, and neither needs the other.
    report = VerificationReport(skipped=not verify)
    source = StreamSource(store=store, device=device, max_memory=max_memory, trust_remote_code=trust_remote_code,
                          verify=verify, verify_tokens=verify_tokens, progress=progress)
    return BakedModel(skeleton, tok, fold_plan, report, sources, base, eff, None, source=source)
