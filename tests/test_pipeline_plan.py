"""The diffusers registry and planner: consumer-bias shifts for weightless LayerNorms, scale-only per-head
RMSNorms, strict registry validation.  Folded in memory and compared with hooks on the denoiser."""

import copy
import json

import pytest
import torch

pytest.importorskip("diffusers")

from bake.core.plan_types import ShiftFold, SiteKind  # noqa: E402
from bake.errors import FoldError  # noqa: E402
from bake.families.diffusers.verify import denoiser_inputs, run_denoiser  # noqa: E402
from bake.fold.execute import apply_plan  # noqa: E402
from bake.plan.diffusers import plan_pipeline  # noqa: E402
from bake.registry.diffusers import RegistryError, load_pipeline_registry, parse_pipeline_registry  # noqa: E402
from lineas.hooks import attach_affine  # noqa: E402
from lineas.pipelines import load_pipeline, pipeline_modules  # noqa: E402


def _baked_vs_hooked(pipe, affines):
    """(max |hooked - base|, max rel |baked - hooked|, plan) for an in-memory bake of ``affines``."""
    mods = pipeline_modules(pipe)
    inputs = denoiser_inputs(next(c for n, c in mods.named_children() if n in ("unet", "transformer")), seed=1)
    base = run_denoiser(pipe, inputs)
    with attach_affine(mods, affines):
        hooked = run_denoiser(pipe, inputs)
    plan = plan_pipeline(mods, affines, require_standard=True)
    apply_plan(mods, plan, affines)
    baked = run_denoiser(pipe, inputs)
    return float((hooked - base).abs().max()), float((baked - hooked).abs().max() / hooked.abs().max()), plan


def test_weightless_layernorm_shift_moves_into_the_feed_forward_bias(tiny_pipeline_folder):
    pipe = load_pipeline(tiny_pipeline_folder("sd"))
    block = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    blk = pipeline_modules(pipe).get_submodule(block)
    blk.norm3 = torch.nn.LayerNorm(64, elementwise_affine=False)  # as norm_elementwise_affine=False builds it
    shift = torch.randn(64, generator=torch.Generator().manual_seed(0))
    moved, err, plan = _baked_vs_hooked(pipe, {f"{block}.norm3": (torch.ones(64), shift)})
    site = plan.site(f"{block}.norm3")
    assert site.shift is ShiftFold.CONSUMERS and site.shift_targets == (f"{block}.ff.net.0.proj",)
    assert moved > 1e-3 and err <= 1e-5, (moved, err)


def test_weightless_layernorm_scale_or_a_bias_free_consumer_is_refused(tiny_pipeline_folder):
    pipe = load_pipeline(tiny_pipeline_folder("sd"))
    block = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    blk = pipeline_modules(pipe).get_submodule(block)
    blk.norm1 = torch.nn.LayerNorm(64, elementwise_affine=False)
    mods = pipeline_modules(pipe)
    with pytest.raises(FoldError, match=rf"{block}.norm1: consumer .*to_q has no bias"):
        plan_pipeline(mods, {f"{block}.norm1": (torch.ones(64), torch.ones(64))}, require_standard=True)
    with pytest.raises(FoldError, match="no standard loading path"):
        plan_pipeline(mods, {f"{block}.norm1": (2 * torch.ones(64), torch.zeros(64))}, require_standard=True)


def test_per_head_rmsnorm_folds_its_scale_only(tiny_pipeline_folder):
    pipe = load_pipeline(tiny_pipeline_folder("sd3"))
    site = "transformer.transformer_blocks.0.attn.norm_q"
    assert type(pipeline_modules(pipe).get_submodule(site)).__name__ == "RMSNorm"
    scale = 1 + 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(0))
    moved, err, plan = _baked_vs_hooked(pipe, {site: (scale, torch.zeros(8))})
    assert plan.site(site).kind is SiteKind.RMSNORM and plan.site(site).source == "registry:diffusers"
    assert moved > 1e-3 and err <= 1e-5, (moved, err)
    with pytest.raises(FoldError, match="per-head RMSNorm on queries"):
        plan_pipeline(pipeline_modules(pipe), {site: (scale, torch.ones(8))}, require_standard=True)


def test_adaln_map_of_the_wrong_length_is_refused(tiny_pipeline_folder):
    mods = pipeline_modules(load_pipeline(tiny_pipeline_folder("flux")))
    with pytest.raises(FoldError, match=r"transformer.norm_out.*length 31.*chunks of 32"):
        plan_pipeline(mods, {"transformer.norm_out": (torch.ones(31), torch.zeros(31))})


def test_an_adaln_site_and_its_own_linear_are_not_baked_together(tiny_pipeline_folder):
    mods = pipeline_modules(load_pipeline(tiny_pipeline_folder("flux")))
    maps = {"transformer.norm_out": (torch.ones(32), torch.ones(32)),
            "transformer.norm_out.linear": (torch.ones(64), torch.ones(64))}
    with pytest.raises(FoldError, match="transformer.norm_out.linear"):
        plan_pipeline(mods, maps)


def test_a_sharded_component_keeps_its_shards(tiny_pipeline_folder, tmp_path):
    import shutil

    from tiny_pipelines import random_maps

    from bake import bake_pipeline

    src = tmp_path / "src"
    shutil.copytree(tiny_pipeline_folder("sd"), src)
    pipe = load_pipeline(src)
    (src / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    pipe.unet.save_pretrained(str(src / "unet"), max_shard_size="300KB")
    shards = sorted(f.name for f in (src / "unet").iterdir())
    assert len([n for n in shards if n.endswith(".safetensors")]) > 2 and any(n.endswith(".index.json") for n in shards)
    maps = random_maps(pipe, ["unet.conv_norm_out", "unet.down_blocks.0.resnets.0.norm1"], seed=4)
    result = bake_pipeline(src, maps, out=tmp_path / "X")
    assert result.report.passed
    assert sorted(f.name for f in (tmp_path / "X" / "unet").iterdir()) == shards
    index = "diffusion_pytorch_model.safetensors.index.json"
    assert (tmp_path / "X" / "unet" / index).read_bytes() == (src / "unet" / index).read_bytes()


def _shipped():
    from importlib import resources

    return json.loads(resources.files("bake.registry").joinpath("archs", "diffusers", "components.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["adaln"][0].update(chunk=["x"]), "unknown key"),
    (lambda d: d["adaln"][0].update(chunks=["shift", "gate"]), "exactly one 'scale'"),
    (lambda d: d["norms"][0].update(kind="batchnorm"), "kind 'batchnorm'"),
    (lambda d: d["norms"][4].update(when={"norm_type": "layer_norm"}), "non-empty list"),
    (lambda d: d["producers"][0].update(layouts=["conv1d"]), "layouts"),
    (lambda d: d.update(family="llm"), "family"),
    (lambda d: d["modulated_norms"][0].update(scale="scale_ff"), "no adaln rule has chunks named 'scale_ff'"),
])
def test_registry_is_validated_strictly(edit, message):
    assert load_pipeline_registry().adaln  # the shipped file is valid
    data = copy.deepcopy(_shipped())
    edit(data)
    with pytest.raises(RegistryError, match=message):
        parse_pipeline_registry(data)
