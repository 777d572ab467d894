"""Learning steering maps on a diffusers pipeline: its denoising loop as the learners' "model".

The LLM learners (:func:`lineas.learn.train.learn_maps`, LinEAS and Linear-AcT) run a model on batches and
pool each site's output.  Here the model is a :class:`PipelineRunner`: the pipeline's components under
their own names (a :class:`lineas.pipelines.PipelineModules`, so sites are ``unet.<path>`` or
``transformer.<path>`` and the hooks, the feature-axis rule and pooling are the shared ones) whose
forward denoises a batch of prompts:

* each prompt has a fixed seed (``seed + its index in the set``), so a prompt always starts from the
  same noise, and source and target prompts at the same index share it;
* a short schedule (``steps`` denoising steps, 1-4 for distilled/turbo models) with
  ``output_type="latent"`` (no VAE decode, as apple/ml-act collects);
* a site's output is pooled per call with :func:`lineas.axis.pool_features` (4-D ``[B, C, H, W]`` over
  HxW, 3-D ``[B, tokens, C]`` over tokens), then averaged over the denoising steps
  (:class:`PromptSeedBatch.pool_calls`).  With classifier-free guidance the denoiser sees
  ``[unconditional; conditional]`` rows: only the conditional half is kept (the unconditional half is
  the same for source and target prompts and carries no source/target difference), while the maps
  act on both halves at inference, as a bake does.

LinEAS needs gradients through the denoising loop, but every diffusers pipeline wraps ``__call__`` in
``torch.no_grad()``: the runner calls the undecorated function (``__call__.__wrapped__``), so the
learners' own grad mode (no grad while collecting, grad while training) decides.  Gradients flow
through all steps: a map changes the latents that later steps see, as it does at inference.

Only denoiser sites are learned here (text-encoder sites would be pooled over the prompt and the
negative-prompt encodings alike); any site can still be baked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lineas.hooks import SteeringError
from lineas.pipelines import (
    PIPELINE_CLASS_KEY,
    PipelineLoadError,
    PipelineModules,
    denoiser_name,
    pipeline_modules,
    split_site,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SITES", "DenoiseSchedule", "PromptSeedBatch", "PromptSeedSet", "PipelineRunner",
           "default_sites", "check_denoiser_sites", "learn_pipeline_maps"]

# Default --sites per denoiser: the norms that fold exactly (bake/registry/archs/diffusers/components.json).
#  unet: the affine LayerNorms norm1/2/3 of every BasicTransformerBlock (the sites LinEAS/AcT steer in SDXL);
#  transformer: the AdaLN norms of the SD3/FLUX double blocks (image and text streams) and FLUX single blocks.
DEFAULT_SITES = {
    "unet": (r"unet\..*transformer_blocks\.\d+\.norm[123]",),
    "transformer": (r"transformer\.(transformer_blocks\.\d+\.norm1(_context)?|single_transformer_blocks\.\d+\.norm)",),
}  # one regex per denoiser: every --sites regex must match, and SD3 has no single blocks


@dataclass(frozen=True)
class DenoiseSchedule:
    """How prompts are denoised while activations are collected (recorded in the maps metadata)."""

    steps: int = 2
    guidance_scale: float | None = None  # None: the pipeline's own default
    height: int | None = None            # None: the pipeline's default size
    width: int | None = None
    seed: int = 0                        # prompt i starts from the noise of seed + i

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise ValueError(f"--denoising-steps must be >= 1, got {self.steps}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and int(v) < 8:
                raise ValueError(f"--image-size must be >= 8 pixels, got {v}")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise ValueError(f"--guidance-scale must be >= 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class PromptSeedBatch:
    """Prompts with their seeds, denoised together; a :class:`lineas.collect.RepeatedCalls` batch."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    calls_per_site: int  # one denoiser call per step: the forward may stop after the last site's last step

    def __len__(self) -> int:
        return len(self.prompts)

    def pool_calls(self, site: str, calls: list[torch.Tensor]) -> torch.Tensor:
        """The mean over denoising steps of each call's pooled ``[rows, D]``, conditional rows only."""
        n, kept = len(self.prompts), []
        for c in calls:
            if c.shape[0] == 2 * n:  # a classifier-free-guidance batch [unconditional; conditional]
                c = c[n:]
            elif c.shape[0] != n:
                raise SteeringError(f"site {site!r}: a call with {c.shape[0]} rows for {n} prompts (expected {n}, "
                                    f"or {2 * n} with classifier-free guidance); learn at denoiser sites only")
            kept.append(c)
        return torch.stack(kept).mean(dim=0)


@dataclass(frozen=True)
class PromptSeedSet:
    """A prompt set for a pipeline: what ``learn_maps`` batches (``TokenSet``'s interface)."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index: Sequence[int], device=None) -> PromptSeedBatch:
        index = list(index)
        return PromptSeedBatch(tuple(self.prompts[i] for i in index), tuple(self.seeds[i] for i in index),
                               self.steps)

    def batches(self, batch_size: int, device=None):
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))


class PipelineRunner(PipelineModules):
    """The pipeline's components (named as sites are) whose forward denoises a :class:`PromptSeedBatch`."""

    def __init__(self, pipe, schedule: DenoiseSchedule):
        super().__init__(dict(pipeline_modules(pipe).named_children()), type(pipe).__name__)
        self.pipe, self.schedule = pipe, schedule  # a DiffusionPipeline is no nn.Module: a plain attribute
        self.denoiser = denoiser_name(pipe)

    def encode(self, prompts: Sequence) -> PromptSeedSet:
        texts = tuple(prompts)
        if not texts:
            raise ValueError("empty prompt set")
        bad = [p for p in texts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"a pipeline takes text prompts, got {bad[0]!r}")
        return PromptSeedSet(texts, tuple(self.schedule.seed + i for i in range(len(texts))), self.schedule.steps)

    def call_kwargs(self, batch: PromptSeedBatch) -> dict:
        s = self.schedule
        kwargs = dict(prompt=list(batch.prompts), num_inference_steps=s.steps, output_type="latent",
                      generator=[torch.Generator().manual_seed(seed) for seed in batch.seeds])
        optional = dict(guidance_scale=s.guidance_scale, height=s.height, width=s.width)
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs

    def forward(self, batch: PromptSeedBatch):
        call = type(self.pipe).__call__
        run = getattr(call, "__wrapped__", call)  # past the pipeline's torch.no_grad(): see the module docstring
        return run(self.pipe, **self.call_kwargs(batch))


def default_sites(denoiser: str) -> tuple[str, ...]:
    try:
        return DEFAULT_SITES[denoiser]
    except KeyError:
        raise PipelineLoadError(f"no default --sites for a {denoiser!r} denoiser; pass --sites") from None


def check_denoiser_sites(sites: Sequence[str], denoiser: str) -> None:
    """Learning is over the denoiser's sites only (see the module docstring)."""
    others = [s for s in sites if split_site(s)[0] != denoiser]
    if others:
        raise SteeringError(f"site(s) {', '.join(others[:4])} are not in the denoiser {denoiser!r}: lineas-train "
                            f"learns maps at {denoiser}.<module path> sites only (other components can be baked, "
                            f"not learned here)")


def learn_pipeline_maps(pipe, source_texts: Sequence[str], target_texts: Sequence[str],
                        sites: Sequence[str] | None = None, config=None, *,
                        schedule: DenoiseSchedule | None = None, progress: bool = True, **learn_kwargs):
    """:func:`lineas.learn.train.learn_maps` on a loaded pipeline (LinEAS or Linear-AcT as ``config.method``
    says).  ``sites``: names or full-match regexes of ``<denoiser>.<path>`` sites (default:
    :data:`DEFAULT_SITES`).  The metadata names the pipeline class (``PIPELINE_CLASS_KEY``) and the
    schedule.  Other keywords go to ``learn_maps`` (``planner``: the fold planner, as there)."""
    from lineas.collect import match_sites
    from lineas.learn.train import learn_maps

    schedule = schedule or DenoiseSchedule()
    runner = PipelineRunner(pipe, schedule)
    names = match_sites(runner, list(sites or default_sites(runner.denoiser)))
    check_denoiser_sites(names, runner.denoiser)
    meta = {PIPELINE_CLASS_KEY: runner.pipeline_class, "model_type": runner.pipeline_class,
            "denoiser": runner.denoiser, "denoising_steps": str(schedule.steps),
            "guidance_scale": "pipeline default" if schedule.guidance_scale is None else str(schedule.guidance_scale),
            "pooling": "mean over HxW or tokens per denoiser call, then over the denoising steps "
                       "(conditional rows of classifier-free-guidance batches)"}
    meta.update(learn_kwargs.pop("metadata", None) or {})
    return learn_maps(runner, None, source_texts, target_texts, names, config, progress=progress,
                      encode=runner.encode, metadata=meta, **learn_kwargs)
