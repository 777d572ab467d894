"""lineas.pipelines: pipeline folders, loading, and sites resolved through PipelineModules."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import call_kwargs  # noqa: E402

from lineas.hooks import SteeringError, attach_affine, resolve_sites  # noqa: E402
from lineas.pipelines import (  # noqa: E402
    PipelineLoadError,
    denoiser_name,
    is_pipeline_folder,
    load_pipeline,
    pipeline_class_name,
    pipeline_modules,
    split_site,
)

# One steered site per kind, with the feature size and the module class the tiny config gives it.
SITES = {
    "sd": ("unet.down_blocks.1.resnets.0.norm1", 32, "GroupNorm"),
    "sdxl": ("unet.down_blocks.1.attentions.0.transformer_blocks.1.norm1", 64, "LayerNorm"),
    "sd3": ("transformer.transformer_blocks.0.norm1", 32, "AdaLayerNormZero"),
    "flux": ("transformer.single_transformer_blocks.0.norm", 32, "AdaLayerNormZeroSingle"),
}
CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux": "FluxPipeline"}


@pytest.mark.parametrize("kind", list(SITES))
def test_sites_resolve_and_hooks_fire_every_step_on_both_cfg_halves(kind, tiny_pipeline_folder):
    folder = tiny_pipeline_folder(kind)
    assert is_pipeline_folder(folder) and pipeline_class_name(folder) == CLASSES[kind]
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == CLASSES[kind]
    assert all(p.dtype == torch.float32 for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters())
    site, dim, cls = SITES[kind]
    mods = pipeline_modules(pipe)
    assert type(resolve_sites(mods, [site])[site]).__name__ == cls
    base = pipe(**call_kwargs(kind)).images
    calls = []
    g = torch.Generator().manual_seed(1)
    scale, shift = 1 + 0.5 * torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    handle = attach_affine(mods, {site: (scale, shift)})
    target = resolve_sites(mods, [site])[site]
    counter = target.register_forward_hook(lambda m, i, o: calls.append((o[0] if isinstance(o, tuple) else o).shape[0]))
    try:
        steered = pipe(**call_kwargs(kind)).images
    finally:
        handle.remove()
        counter.remove()
    assert not torch.equal(torch.from_numpy(base), torch.from_numpy(steered))
    # 2 steps; CFG doubles the batch (SD/SDXL/SD3) or runs the negative pass separately (FLUX true CFG)
    assert sum(calls) == 2 * 2, calls
    again = pipe(**call_kwargs(kind)).images
    assert torch.equal(torch.from_numpy(base), torch.from_numpy(again))  # the hooks are gone
    assert denoiser_name(pipe) == split_site(site)[0]


def test_wrong_site_and_bad_folders_name_the_offender(tmp_path, tiny_pipeline_folder):
    mods = pipeline_modules(load_pipeline(tiny_pipeline_folder("sd")))
    with pytest.raises(SteeringError, match="unet.down_blocks.9"):
        resolve_sites(mods, ["unet.down_blocks.9.resnets.0.norm1"])
    with pytest.raises(PipelineLoadError, match=str(tmp_path)):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(PipelineLoadError, match="NoSuchPipeline.*trust"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="'unet'"):
        split_site("unet")
