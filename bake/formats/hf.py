"""The HF exporter of a model folded in memory, and the pieces both HF exporters share (the dtype cast,
the base model's tokenizer and generation files, the reload)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bake.errors import NonFiniteCastError
from bake.fold.remote_code import write_remote_code
from bake.formats.baked import Baked
from bake.formats.base import EXPORT_DTYPES, ExportOptions, ExportResult
from bake.formats.shard_writer import set_config_dtype
from bake.formats.tokenization import export_tokenizer_mismatch
from bake.verify.check import bar_disabled, compare, model_device
from bake.verify.image_probe import compare_image
from bake.verify.tolerances import reload_row
from lineas.models import TOKENIZER_FILES, auto_model_class

GENERATION_FILES = ("generation_config.json",)
# A vision-language model's processor (image preprocessing, the processor's own settings, its chat template):
# copied whenever the base has them, so the export runs images as the base does.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")
REMOTE_CODE_PARAM_SUFFIXES = (".lineas_scale", ".lineas_shift")  # kept in fp32, like the hooks compute


def state_dict_in(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The state dict cast to ``dtype`` (None for float32: save as is).

    Tensors that share storage (tied embeddings) stay shared after the cast, so
    transformers still writes them once.  Affine-fallback parameters stay fp32.
    Raises :class:`NonFiniteCastError` naming the tensors that become inf/NaN in ``dtype``.
    """
    if dtype == torch.float32:
        return None
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    bad: dict[str, int] = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or k.endswith(REMOTE_CODE_PARAM_SUFFIXES):
            out[k] = v
            continue
        key = (v.data_ptr(), tuple(v.shape), v.stride())
        if key not in cast:
            cast[key] = v.to(dtype)
            n_bad = int((~torch.isfinite(cast[key])).sum())
            if n_bad:
                bad[k] = n_bad
        out[k] = cast[key]
    if bad:
        raise NonFiniteCastError(dtype, bad)
    return out


def _sites_writing(plan, tensors: Sequence[str]) -> list[str]:
    """The plan's sites whose fold steps write any of ``tensors``."""
    return [p.site for p in plan.sites if any(t in step.tensors for step in p.steps for t in tensors)]


@contextmanager
def explained_cast_failure(plan, dtype: str, base_overflows: Callable[[str], bool] = lambda name: False):
    """Re-raise a :class:`NonFiniteCastError` saying which maps, or the base model, overflow ``dtype``.
    ``base_overflows(tensor)``: whether the tensor's value BEFORE the fold already overflows ``dtype`` (then the
    base model is to blame, even where a fold wrote the tensor)."""
    try:
        yield
    except NonFiniteCastError as e:
        by_maps = [t for t in e.tensors if _sites_writing(plan, [t]) and not base_overflows(t)]
        sites = _sites_writing(plan, by_maps)
        if sites:
            where, advice = (f"folded from the map(s) at site(s) {', '.join(sites)}",
                             "Export in float32 or bfloat16, or use a smaller strength")
        else:
            where, advice = ("not written by the steering, or out of range before it: the base model itself does "
                             "not fit this dtype", "Export in float32 or bfloat16")
        raise NonFiniteCastError(e.dtype, e.counts, f" ({where}); nothing was written. {advice}") from None


def overflows_in(dtype: str, absmax: Mapping[str, float]) -> Callable[[str], bool]:
    """``base_overflows`` for :func:`explained_cast_failure` from the tensors' max |value| before the fold."""
    limit = torch.finfo(EXPORT_DTYPES[dtype]).max
    return lambda name: absmax.get(name, 0.0) > limit


def _cast_state_dict(baked: Baked, dtype: str) -> dict[str, torch.Tensor] | None:
    with explained_cast_failure(baked.plan, dtype, overflows_in(dtype, baked.base_absmax)):
        return state_dict_in(baked.model, EXPORT_DTYPES[dtype])


def _source_file(base_path: str, name: str) -> Path | None:
    """A file of the base checkpoint: from its directory, or from the local Hub cache (never the network)."""
    local = Path(base_path).expanduser()
    if local.is_dir():
        p = local / name
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(base_path, name)
    except ValueError:  # not a valid repo id (HFValidationError): nothing to copy
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def copy_base_files(baked: Baked, folder: Path) -> bool:
    """Copy tokenizer (only when the base has one), generation config and processor files verbatim. Returns True
    if a tokenizer was written."""
    for name in GENERATION_FILES + PROCESSOR_FILES:
        src = _source_file(baked.base.path, name)
        if src is not None:
            shutil.copyfile(src, folder / name)
    copied = 0
    for name in TOKENIZER_FILES:  # also without a tokenizer transformers loads: a sentencepiece tokenizer.model
        src = _source_file(baked.base.path, name)  # is what llama.cpp's converter reads, for example
        if src is not None:
            shutil.copyfile(src, folder / name)
            copied += 1
    if baked.tokenizer is None:
        return False
    if not copied:  # tokenizer came from somewhere we cannot copy from: let it serialise itself
        baked.tokenizer.save_pretrained(folder)
    return True


def has_remote_code(folder: Path) -> bool:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return bool(cfg.get("auto_map"))


def reload_hf(folder: Path, dtype: str, device, trust_remote_code: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = auto_model_class(config).from_pretrained(folder, config=config, dtype=EXPORT_DTYPES[dtype],
                                                     trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def export_hf_in_memory(baked: Baked, folder: Path, opts: ExportOptions) -> ExportResult:
    """The HF export of a model folded in memory: ``save_pretrained``, remote code if any, the base's
    tokenizer files, then the written folder reloaded and compared with the hooked reference."""

    steps = tqdm(total=4, desc="save", disable=bar_disabled(opts.progress), leave=False)
    try:
        steps.set_postfix_str("weights")
        baked.model.save_pretrained(folder, state_dict=_cast_state_dict(baked, opts.dtype),
                                    safe_serialization=True, max_shard_size=opts.max_shard_size)
        set_config_dtype(folder, opts.dtype)
        steps.update()
        steps.set_postfix_str("remote code")
        write_remote_code(baked.model, folder)
        remote = has_remote_code(folder)
        steps.update()
        steps.set_postfix_str("tokenizer")
        tok = copy_base_files(baked, folder)
        steps.update()
        checks = []
        if baked.reference is not None:
            steps.set_postfix_str("reload check")
            # Our own freshly written code: trusting it is what the user will have to do.
            reloaded = reload_hf(folder, opts.dtype, model_device(baked.model), trust_remote_code=remote)
            check, _ = compare(reloaded, baked.reference, reload_row(opts.dtype),
                               label=f"exported {opts.dtype}, reloaded", progress=opts.progress)
            if tok and (fail := export_tokenizer_mismatch(folder, baked.tokenizer)):  # text in: the ids first
                check.failures.append(fail)
            checks.append(check)
            if (image := baked.reference.image) is not None:  # a VLM's image+text probe: float32 weights only
                floor = baked.reference.noise_floor.max_rel if baked.reference.noise_floor is not None else None
                fp32 = opts.dtype == "float32"
                checks.append(compare_image(reloaded if fp32 else baked.model, image, floor,
                                            label=check.label if fp32 else "baked float32 (in memory)"))
            del reloaded
        steps.update()
    finally:
        steps.close()
    return ExportResult("hf", checks=checks, remote_code=remote, has_tokenizer=tok)
