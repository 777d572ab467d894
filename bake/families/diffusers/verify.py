"""Verify a pipeline bake: the family runner and metrics for diffusers pipelines.

Two probes, both run on the hooked reference (the original pipeline plus steering hooks), on the base
pipeline (no hooks: the maps must change something by more than the check's limit, else the check could not
tell a bake from no bake: :mod:`bake.verify.guard`) and on the candidate (the written folder, reloaded with
plain ``DiffusionPipeline.from_pretrained``):

* the denoiser (UNet or transformer) on random latents, timesteps and conditioning, a batch of 2
  (the size of a classifier-free-guidance batch): row ``pipeline-denoiser-float32``, max relative error;
* the whole pipeline with a fixed seed, a few steps, guidance on, ``output_type="np"``: row
  ``pipeline-image-float32``, max absolute pixel difference in [0, 1].

Rows and limits: :mod:`bake.verify.tolerances`.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bake.verify.guard import Change
from bake.verify.report import format_table
from bake.verify.tolerances import get_tolerance
from lineas.hooks import attach_affine
from lineas.pipelines import denoiser_name, pipeline_modules

DENOISER_ROW, IMAGE_ROW = "pipeline-denoiser-float32", "pipeline-image-float32"
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"
TOKENS = 8          # conditioning tokens in the denoiser probe
LATENT_SIDE = 16    # latent height/width of both probes (image side = 16 * the VAE's scale factor)


def _dim(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def denoiser_inputs(denoiser: nn.Module, seed: int = 0, batch: int = 2) -> dict:
    """Random inputs for one denoiser call, by class (UNet2DConditionModel, SD3/FLUX transformers)."""
    g = torch.Generator().manual_seed(seed)
    cfg, cls = denoiser.config, type(denoiser).__name__

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if cls == "UNet2DConditionModel":
        out = dict(sample=randn(batch, cfg.in_channels, LATENT_SIDE, LATENT_SIDE),
                   timestep=torch.randint(0, 1000, (batch,), generator=g),
                   encoder_hidden_states=randn(batch, TOKENS, _dim(cfg.cross_attention_dim)))
        if cfg.addition_embed_type == "text_time":
            text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": randn(batch, text),
                                        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)}
        return out
    if cls == "SD3Transformer2DModel":
        return dict(hidden_states=randn(batch, cfg.in_channels, LATENT_SIDE, LATENT_SIDE),
                    encoder_hidden_states=randn(batch, TOKENS, cfg.joint_attention_dim),
                    pooled_projections=randn(batch, cfg.pooled_projection_dim),
                    timestep=torch.rand(batch, generator=g) * 1000)
    if cls == "FluxTransformer2DModel":
        side = LATENT_SIDE // 2  # FLUX packs 2x2 latent patches into tokens
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                             indexing="ij"), -1).reshape(-1, 3).float()
        out = dict(hidden_states=randn(batch, side * side, cfg.in_channels),
                   encoder_hidden_states=randn(batch, TOKENS, cfg.joint_attention_dim),
                   pooled_projections=randn(batch, cfg.pooled_projection_dim),
                   timestep=torch.rand(batch, generator=g), img_ids=img_ids, txt_ids=torch.zeros(TOKENS, 3))
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5)
        return out
    raise NotImplementedError(f"no random-input recipe for a {cls} denoiser")


def _to(obj, device):
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


def run_denoiser(pipe, inputs: dict) -> torch.Tensor:
    den = pipe.components[denoiser_name(pipe)]
    with torch.no_grad():
        return den(**_to(inputs, den.device), return_dict=False)[0].detach().float().cpu()


def pipeline_call(pipe, seed: int = 0, steps: int = 2) -> dict:
    """A short deterministic call with guidance on, for whatever the pipeline's signature accepts."""
    params = inspect.signature(pipe.__call__).parameters
    side = LATENT_SIDE * int(getattr(pipe, "vae_scale_factor", 8))
    kw = dict(prompt=PROMPT, num_inference_steps=steps, height=side, width=side, output_type="np",
              generator=torch.Generator().manual_seed(seed))
    optional = dict(negative_prompt=NEGATIVE, guidance_scale=5.0, true_cfg_scale=4.0, max_sequence_length=TOKENS * 2)
    kw.update({k: v for k, v in optional.items() if k in params})
    return kw


def run_image(pipe, seed: int = 0, steps: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return torch.from_numpy(pipe(**pipeline_call(pipe, seed, steps)).images).float()


@dataclass(frozen=True)
class Outputs:
    denoiser: torch.Tensor | None   # None: no random-input recipe for this denoiser class
    image: torch.Tensor


def record(pipe, affines=None, *, seed: int = 0, steps: int = 2) -> Outputs:
    """The pipeline's outputs on both probes, with ``affines`` (site -> (scale, shift)) hooked if given."""
    handle = attach_affine(pipeline_modules(pipe), affines) if affines else None
    try:
        try:
            den = run_denoiser(pipe, denoiser_inputs(pipe.components[denoiser_name(pipe)], seed))
        except NotImplementedError:
            den = None
        return Outputs(denoiser=den, image=run_image(pipe, seed, steps))
    finally:
        if handle is not None:
            handle.remove()


def max_rel(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """Per sample ``max |cand - ref| / max |ref|``, the largest over the batch (as the LLM rows)."""
    diff = (cand.double() - ref.double()).abs().flatten(1).amax(1)
    return float((diff / ref.double().abs().flatten(1).amax(1).clamp_min(1e-30)).max())


def max_abs(ref: torch.Tensor, cand: torch.Tensor) -> float:
    return float((cand.double() - ref.double()).abs().max())


@dataclass(frozen=True)
class Row:
    check: str
    tolerance: str
    metric: str
    value: float | None
    limit: float | None
    vs_base: float | None     # the same metric, hooked vs base: how much the maps change the output
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class PipelineReport:
    rows: tuple[Row, ...]
    steps: int
    seed: int
    skipped: bool = False

    @property
    def passed(self) -> bool:
        return self.skipped or all(r.passed for r in self.rows)

    def failures(self) -> list[str]:
        return [f"{r.check}: " + (r.note or f"{r.metric} {r.value:.3g} exceeds {r.limit:g} ({r.tolerance})")
                for r in self.rows if not r.passed]

    def failure_details(self) -> str:  # bake.verify.report.Report: what the CLI prints on failure
        return failure_details(self.to_table())

    def to_table(self) -> str:
        if self.skipped:
            return "verification skipped (--no-verify)"
        return rows_table(self.rows, "baked vs hooked")

    def to_dict(self) -> dict:
        return {"family": "diffusers", "passed": self.passed, "skipped": self.skipped, "steps": self.steps,
                "seed": self.seed, "rows": [asdict(r) for r in self.rows],
                "tolerances": {n: get_tolerance(n).to_dict() for n in (DENOISER_ROW, IMAGE_ROW)}}


def compare(base: Outputs, hooked: Outputs, cand: Outputs, *, steps: int, seed: int) -> PipelineReport:
    """The report: each probe's candidate error against its row's limit (the guard,
    :meth:`bake.families.diffusers.family.DiffusersFamily.reference`, made sure the maps change the hooked
    output by more than the limits, so the check can tell a bake from no bake)."""
    rows = []
    den_tol, img_tol = get_tolerance(DENOISER_ROW), get_tolerance(IMAGE_ROW)
    if hooked.denoiser is None:
        rows.append(Row(check="denoiser", tolerance=DENOISER_ROW, metric="max_rel", value=None, limit=den_tol.max_rel,
                        vs_base=None, passed=True, note="no random-input recipe for this denoiser class: not run"))
    else:
        value, vs_base = max_rel(hooked.denoiser, cand.denoiser), max_rel(hooked.denoiser, base.denoiser)
        rows.append(make_row("denoiser", DENOISER_ROW, "max_rel", value, den_tol.max_rel, vs_base))
    value, vs_base = max_abs(hooked.image, cand.image), max_abs(hooked.image, base.image)
    rows.append(make_row("image", IMAGE_ROW, "max_abs", value, img_tol.max_abs, vs_base))
    return PipelineReport(rows=tuple(rows), steps=steps, seed=seed)


def changes(base, hooked, denoiser_row: str, image_row: str) -> list[Change]:
    """How far the maps move each probe (hooked vs base, in the metric and against the limit of the check's
    rows); ``base``/``hooked``: :class:`Outputs` or ONNX references (``.denoiser``, ``.image``)."""
    out = []
    if hooked.denoiser is not None:
        out.append(Change("denoiser", "max_rel", max_rel(hooked.denoiser, base.denoiser),
                          get_tolerance(denoiser_row).max_rel))
    out.append(Change("image", "max_abs", max_abs(hooked.image, base.image), get_tolerance(image_row).max_abs))
    return out


def failure_details(table: str) -> str:
    """A pipeline report's :meth:`bake.verify.report.Report.failure_details`: its table, and why there is no
    per-site table."""
    return (table + "\n\nper-site divergence is not measured for pipelines; --dry-run prints each site's fold "
            "(bake fewer sites to find the one that diverges)")


def rows_table(rows, candidate: str) -> str:
    """The verification table of pipeline ``rows`` (the torch check's and the ONNX Runtime check's);
    ``candidate`` names the compared column, e.g. "baked vs hooked"."""
    head = ("check", "row", "metric", candidate, "limit", "hooked vs base", "result")
    return format_table([head] + [(r.check, r.tolerance, r.metric, "-" if r.value is None else f"{r.value:.3g}",
                                   "-" if r.limit is None else f"{r.limit:g}",
                                   "-" if r.vs_base is None else f"{r.vs_base:.3g}",
                                   ("ok" if r.passed else "FAIL") + (f" ({r.note})" if r.note else ""))
                                  for r in rows])


def make_row(check: str, tol: str, metric: str, value: float, limit: float, vs_base: float | None) -> Row:
    """A row that passes when ``value`` is finite and within ``limit``; ``vs_base``: the same metric, hooked
    vs base (shown beside it; the guard refused maps that change nothing the check can see)."""
    finite = value == value and value != float("inf")
    return Row(check=check, tolerance=tol, metric=metric, value=value, limit=limit, vs_base=vs_base,
               passed=finite and value <= limit)
