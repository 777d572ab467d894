"""The image+text probe of a vision-language model (issue 28): one input through the vision tower too.

The text probes (:mod:`bake.verify.probes`) give a VLM token ids only, so its vision tower and projector never
run and the image tokens' positions are never compared.  When the source folder has a processor
(``AutoProcessor.from_pretrained(folder)``, offline, no remote code, with an image processor), one more probe is
built from it: a small generated image (:func:`probe_image`, a two-colour gradient the processor resizes) and a
short text with the processor's image placeholder (its chat template when it has one).  The hooked source model
(the same weights and hooks as the rest of the reference) records its logits on it, and the base model's too:
how far the maps move this probe (``hooked_vs_base_max_rel``) is reported beside the check, so a reader sees
that the check can fail.  Each HF export's reload check then runs the probe through the reloaded model and
compares every position's logits (row :attr:`bake.verify.tolerances.Row.RELOAD_IMAGE_TEXT_F32`).

Without a processor no image probe is built, and the reference carries a note saying why (the report prints it
as a warning): a VLM is never verified on text only silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bake.verify.reference import ImageReference
from bake.verify.report import CheckResult, at_most
from bake.verify.stats import logit_stats
from bake.verify.tolerances import Row, Tolerance, get_tolerance
from lineas.evaluate import input_device
from lineas.hooks import attach_affine
from lineas.models import is_vision_language

PROBE_TEXT = "Describe this picture."
IMAGE_SIZE = 64  # pixels a side; the processor resizes it to what its vision tower takes
COLOURS = ((220, 40, 30), (30, 60, 200))  # the gradient's two ends (red -> blue, left to right and down)
LABEL = "image+text probe"
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")  # one of them: the folder has a processor


def probe_image(size: int = IMAGE_SIZE):
    """A deterministic ``size`` x ``size`` RGB image: a diagonal gradient between :data:`COLOURS`."""
    from PIL import Image

    ramp = torch.linspace(0.0, 1.0, size)
    t = ((ramp[None, :] + ramp[:, None]) / 2)[..., None]  # [H, W, 1]
    a, b = (torch.tensor(c, dtype=torch.float32) for c in COLOURS)
    pixels = ((1 - t) * a + t * b).round().to(torch.uint8)
    return Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist()))


def load_processor(source: str | None):
    """``(processor, None)`` for a source folder with an image processor, else ``(None, why)``."""
    folder = Path(source).expanduser() if source else None
    if folder is None or not folder.is_dir():
        return None, "the model was not loaded from a local folder, so there is no processor to build the probe with"
    if not any((folder / name).is_file() for name in PROCESSOR_CONFIGS):
        return None, f"the source folder {source!r} has no processor ({' or '.join(PROCESSOR_CONFIGS)})"
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # a remote-code processor, a missing optional dependency, a broken file
        why = str(e).splitlines()[0][:200] if str(e) else ""
        return None, f"AutoProcessor.from_pretrained({source!r}) failed offline ({type(e).__name__}: {why})"
    if getattr(processor, "image_processor", None) is None:
        return None, f"the source folder {source!r} has no image processor (preprocessor_config.json)"
    return processor, None


def probe_text(processor) -> str:
    """The probe's text: a user turn of the processor's chat template (an image, then :data:`PROBE_TEXT`), or the
    processor's image placeholder before :data:`PROBE_TEXT` when it has no template."""
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_TEXT}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    # Gemma-3's processor expands its begin-of-image token; the others their image token.
    placeholder = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None) or "<image>"
    return f"{placeholder} {PROBE_TEXT}"


def build_inputs(processor) -> dict[str, torch.Tensor]:
    """The processor's tensors for :func:`probe_image` and :func:`probe_text` (batch of one)."""
    out = processor(text=[probe_text(processor)], images=[probe_image()], return_tensors="pt")
    return {k: v for k, v in dict(out).items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def image_logits(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model``'s float32 logits on the probe, on the CPU (inputs moved to the model, float ones in its dtype)."""
    device = input_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    moved = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    out = model(**moved, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).detach().to("cpu", torch.float32)


def record_image_reference(model: nn.Module, affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                           source: str | None) -> tuple[ImageReference | None, str | None]:
    """The image+text probe of a vision-language ``model`` loaded from ``source``: ``(reference, None)``, or
    ``(None, note)`` saying why there is none; ``(None, None)`` for a model that is not a VLM."""
    if not is_vision_language(getattr(model, "config", None)):
        return None, None
    processor, why = load_processor(source)
    if processor is None:
        return None, f"{LABEL} not run: {why}; this vision-language model was verified on text probes only"
    try:
        inputs = build_inputs(processor)
        base = image_logits(model, inputs)
        with attach_affine(model, affines):
            hooked = image_logits(model, inputs)
    except Exception as e:  # a processor whose output the model does not take: say so, do not guess
        return None, (f"{LABEL} not run: the processor's inputs failed in the model ({type(e).__name__}: {e}); "
                      "this vision-language model was verified on text probes only")
    ref = ImageReference(inputs, hooked, 0.0, 1.0)
    st = logit_stats([ref.probe], [hooked], [base])
    ref.hooked_vs_base_max_rel, ref.hooked_vs_base_top1 = st.max_rel, st.top1
    ref.details = {"image_size": [IMAGE_SIZE, IMAGE_SIZE], "text": probe_text(processor),
                   "input_shapes": {k: list(v.shape) for k, v in inputs.items()}}
    return ref, None


def visibility_note(ref: ImageReference, limit: float | None) -> str | None:
    """A note when the maps do not move the probe by more than ``limit``: its check then cannot fail."""
    if limit is None or ref.hooked_vs_base_max_rel > limit:
        return None
    return (f"{LABEL}: the maps move its logits by max rel {ref.hooked_vs_base_max_rel:.3g} only (<= {limit:.3g}), "
            "so its check cannot tell a wrong fold from a sound one")


def compare_image(candidate: nn.Module, ref: ImageReference, noise_floor: float | None, *, label: str,
                  tolerance: str | Tolerance = Row.RELOAD_IMAGE_TEXT_F32) -> CheckResult:
    """The candidate's logits on the probe against the hooked ones, every position (max rel, KL, top-1), judged
    by ``tolerance`` (the max-rel limit scaled by the text probes' ``noise_floor``, as the reload row's)."""
    tol = get_tolerance(tolerance) if isinstance(tolerance, str) else tolerance
    with torch.no_grad():
        got = image_logits(candidate, ref.inputs)
    st = logit_stats([ref.probe], [ref.logits], [got])
    rel_limit = tol.max_rel_limit(noise_floor)
    failures = []
    if rel_limit is not None and not at_most(st.max_rel, rel_limit):
        failures.append(f"max relative logit error {st.max_rel:.3g} > {rel_limit:.3g}")
    if tol.max_mean_kl is not None and not at_most(st.mean_kl, tol.max_mean_kl):
        failures.append(f"mean KL {st.mean_kl:.3g} > {tol.max_mean_kl:g}")
    if tol.min_top1 is not None and not st.top1 >= tol.min_top1:
        failures.append(f"top-1 agreement {st.top1:.4f} < {tol.min_top1:g}")
    details = dict(ref.details, hooked_vs_base_max_rel=ref.hooked_vs_base_max_rel,
                   hooked_vs_base_top1=ref.hooked_vs_base_top1)
    return CheckResult(label=f"{LABEL}, {label}", tolerance=tol, max_abs=st.max_abs, max_rel=st.max_rel,
                       mean_kl=st.mean_kl, top1=st.top1, greedy_matched=0, greedy_total=0,
                       per_probe=st.per_probe, failures=failures, max_rel_limit=rel_limit, details=details)
