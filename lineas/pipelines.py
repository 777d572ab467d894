"""diffusers pipelines as steerable module trees.

A pipeline *site* is ``<component>.<module path>``, relative to the pipeline, e.g.
``unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1`` or
``transformer.transformer_blocks.3.norm1``.  There is ONE way to resolve it:
:class:`PipelineModules`, an ``nn.Module`` container whose named children are the pipeline's
``nn.Module`` components (``unet``, ``text_encoder``, ``vae``, ``transformer``...).  Its
``named_modules()`` therefore yields exactly the site names, so :func:`lineas.hooks.attach_affine`,
:func:`lineas.hooks.resolve_sites` and the :mod:`lineas.axis` rule work unchanged (tuple outputs,
e.g. the ``(y, gates...)`` of AdaLN norms, are steered on element 0).  Registering a component in
the container does not copy or move it: hooks attached through the container fire inside the
pipeline, at every denoising step and on both halves of a classifier-free-guidance batch.

This module imports diffusers only when a pipeline is loaded, so ``lineas`` works without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lineas.errors import ModelLoadError
from lineas.io import plain_name

__all__ = ["MODEL_INDEX", "PIPELINE_CLASS_KEY", "DENOISERS", "PipelineLoadError", "PipelineModules",
           "is_pipeline_folder", "read_model_index", "pipeline_class_name", "load_pipeline", "pipeline_modules",
           "denoiser_name", "split_site", "require_diffusers"]

MODEL_INDEX = "model_index.json"
# lineas-maps v1 metadata key (a plain string entry, so v1 readers are unaffected): the diffusers
# pipeline class the maps were learned on, e.g. "StableDiffusionXLPipeline".
PIPELINE_CLASS_KEY = "pipeline_class"
# The component that predicts the noise, in the order a pipeline is searched for it.
DENOISERS = ("unet", "transformer", "prior", "decoder")
DIFFUSERS_INSTALL = "pip install 'lineas-bake[diffusers]'  (diffusers>=0.30,<0.40)"


class PipelineLoadError(ModelLoadError):
    """A pipeline folder could not be read or loaded; the message names the folder."""


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    """True for a local folder holding a diffusers ``model_index.json``."""
    return (Path(path) / MODEL_INDEX).is_file()


def read_model_index(path: str | os.PathLike) -> dict:
    """The parsed ``model_index.json`` of a pipeline folder (a :class:`PipelineLoadError` naming it else)."""
    index = Path(path) / MODEL_INDEX
    try:
        data = json.loads(index.read_text())
    except FileNotFoundError:
        raise PipelineLoadError(f"{path}: no {MODEL_INDEX}, not a diffusers pipeline folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineLoadError(f"{index}: unreadable ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise PipelineLoadError(f"{index}: no '_class_name' string; not a diffusers model index")
    for name in data:  # a component's name is the folder it lives in: it must stay inside the pipeline folder
        if not name.startswith("_"):
            try:
                plain_name(name, "component")
            except ValueError as e:
                raise PipelineLoadError(f"{index}: {e}") from None
    return data


def pipeline_class_name(path: str | os.PathLike) -> str:
    return read_model_index(path)["_class_name"]


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise PipelineLoadError(f"diffusers pipelines need the diffusers package; install it with:\n    "
                                f"{DIFFUSERS_INSTALL}") from None
    return diffusers


def load_pipeline(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                  device: str = "cpu", progress: bool = False):
    """``DiffusionPipeline.from_pretrained(path)`` in ``dtype`` (float32 by default), without remote
    code unless asked.  Errors are :class:`PipelineLoadError` naming the folder.  diffusers' "Loading
    pipeline components" bar is shown only with ``progress`` (the CLIs pass: on a terminal, not --quiet).
    The loaded pipeline's own denoising bar is always off."""
    path = Path(path)
    class_name = pipeline_class_name(path)  # checks the folder before importing anything heavy
    diffusers = require_diffusers()
    if not trust_remote_code and not hasattr(diffusers, class_name):
        raise PipelineLoadError(f"{path}: pipeline class {class_name!r} is not in diffusers {diffusers.__version__}; "
                                f"a custom pipeline runs remote code: pass trust_remote_code=True "
                                f"(--trust-remote-code) if you trust it")
    from diffusers.utils import logging as diffusers_logging

    bar_was_on = diffusers_logging.is_progress_bar_enabled()
    if not progress:
        diffusers_logging.disable_progress_bar()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype,
                                                           trust_remote_code=trust_remote_code)
    except Exception as e:  # diffusers raises many types (OSError, ValueError, EnvironmentError...)
        raise PipelineLoadError(f"{path}: could not load the {class_name} pipeline: {type(e).__name__}: {e}") from e
    finally:
        if bar_was_on:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class PipelineModules(nn.Module):
    """The pipeline's ``nn.Module`` components as named children (see the module docstring)."""

    def __init__(self, components: dict[str, nn.Module], pipeline_class: str = ""):
        super().__init__()
        if not components:
            raise PipelineLoadError(f"pipeline {pipeline_class or '?'} has no torch components to steer")
        for name, module in components.items():
            self.add_module(name, module)
        self.pipeline_class = pipeline_class

    def forward(self, *args, **kwargs):  # the pipeline runs the components, never the container
        raise TypeError("PipelineModules only names a pipeline's components for hooks; call the pipeline itself")


def pipeline_modules(pipe) -> PipelineModules:
    """The container for a loaded pipeline: every ``nn.Module`` component, in ``model_index`` order."""
    comps = {name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)}
    return PipelineModules(comps, type(pipe).__name__)


def denoiser_name(pipe_or_components) -> str:
    """``unet`` or ``transformer`` (the noise predictor's component name)."""
    comps = pipe_or_components.components if hasattr(pipe_or_components, "components") else pipe_or_components
    for name in DENOISERS:
        if isinstance(comps.get(name), nn.Module):
            return name
    raise PipelineLoadError(f"no denoiser among the components {sorted(comps)} (looked for {', '.join(DENOISERS)})")


def split_site(site: str) -> tuple[str, str]:
    """``"unet.down_blocks.0.resnets.0.norm1"`` -> ``("unet", "down_blocks.0.resnets.0.norm1")``."""
    component, sep, rest = site.partition(".")
    if not sep or not component or not rest:
        raise ValueError(f"pipeline site {site!r} is not '<component>.<module path>'")
    return component, rest
