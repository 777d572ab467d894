"""bake/families/diffusers/onnx.py: baked SD/SDXL pipelines exported by optimum-onnx, checked in ONNX Runtime."""

import json
import re

import pytest
import torch
from onnx_extra import require_onnx_extra  # noqa: E402

pytest.importorskip("diffusers")
require_onnx_extra()

from bake.errors import VerificationError  # noqa: E402
from bake.families.diffusers.onnx import DENOISER_ROW, IMAGE_ROW, export_pipeline_onnx, record_reference  # noqa: E402
from bake.formats.onnx import ONNX_REPORT_FILE, OnnxExportError  # noqa: E402
from bake.verify.tolerances import get_tolerance  # noqa: E402
from lineas.hooks import resolve_sites  # noqa: E402
from lineas.pipelines import load_pipeline, pipeline_modules  # noqa: E402

NORMS = r"unet\..*transformer_blocks\.\d+\.norm[123]"  # affine LayerNorms: y -> a*y + b folds into w, b
CALL = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=2, height=32, width=32,
            guidance_scale=5.0, output_type="np")


def unet_inputs(unet, seed=1):
    """A batch of 2 with a different timestep per sample."""
    g, cfg = torch.Generator().manual_seed(seed), unet.config
    out = dict(sample=torch.randn(2, cfg.in_channels, 16, 16, generator=g), timestep=torch.tensor([999, 401]),
               encoder_hidden_states=torch.randn(2, 8, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        out["added_cond_kwargs"] = {"text_embeds": torch.randn(2, text, generator=g),
                                    "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(2, 1)}
    return out


def bake_layernorms(pipe, folder, seed=0):
    """Random maps on every transformer-block LayerNorm, folded into its weight and bias (the fold is
    exact: a*(w*n + c) + b = (a*w)*n + (a*c + b)); the folded pipeline is saved to ``folder``.
    Returns the maps as affines.  Test scaffolding only: the baker (bake.families.diffusers.bake) makes real ones."""
    mods = resolve_sites(pipeline_modules(pipe), [n for n, _ in pipeline_modules(pipe).named_modules()
                                                  if re.fullmatch(NORMS, n)])
    g = torch.Generator().manual_seed(seed)
    affines = {s: (1 + 0.3 * (2 * torch.rand(m.normalized_shape[0], generator=g) - 1),
                   0.3 * torch.randn(m.normalized_shape[0], generator=g)) for s, m in mods.items()}
    return affines, lambda: _fold_and_save(pipe, mods, affines, folder)


def _fold_and_save(pipe, mods, affines, folder):
    with torch.no_grad():
        for s, m in mods.items():
            a, b = affines[s]
            m.weight.mul_(a)
            m.bias.mul_(a).add_(b)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind,ort_class", [("sd", "ORTStableDiffusionPipeline"),
                                            ("sdxl", "ORTStableDiffusionXLPipeline")])
def test_baked_pipeline_in_onnx_runtime_matches_the_hooked_one(kind, ort_class, tiny_pipeline_folder, tmp_path):
    folder = tiny_pipeline_folder(kind)
    pipe = load_pipeline(folder)
    inputs = unet_inputs(pipe.unet)
    affines, bake = bake_layernorms(pipe, tmp_path / "baked")
    base = record_reference(pipe, None, denoiser_inputs=inputs, call_kwargs=CALL, seed=3)
    hooked = record_reference(pipe, affines, denoiser_inputs=inputs, call_kwargs=CALL, seed=3)
    assert (hooked.denoiser - base.denoiser).abs().max() > 1e-2 and (hooked.image - base.image).abs().max() > 1e-3
    baked = bake()

    report = export_pipeline_onnx(baked, tmp_path / "onnx", hooked, base=base)
    assert report.passed and report.ort_class == ort_class
    rows = {r.tolerance: r for r in report.rows}
    assert rows[DENOISER_ROW].value <= get_tolerance(DENOISER_ROW).max_rel
    assert rows[IMAGE_ROW].value <= get_tolerance(IMAGE_ROW).max_abs
    assert rows[DENOISER_ROW].vs_base > 100 * rows[DENOISER_ROW].value  # the check could tell no bake from a bake
    encoders = {"text_encoder/model.onnx"} | ({"text_encoder_2/model.onnx"} if kind == "sdxl" else set())
    assert encoders | {"unet/model.onnx", "vae_decoder/model.onnx", "model_index.json"} <= set(report.files)
    saved = json.loads((tmp_path / "onnx" / ONNX_REPORT_FILE).read_text())
    assert saved["passed"] and saved["ort_class"] == ort_class

    if kind == "sd":  # the unbaked pipeline in ORT is not the hooked one: refused, nothing left
        with pytest.raises(VerificationError, match="exceeds") as e:
            export_pipeline_onnx(folder, tmp_path / "onnx-unbaked", hooked, base=base)
        assert not e.value.report.passed and not (tmp_path / "onnx-unbaked").exists()
        print(report.to_table())


def test_unsupported_pipeline_and_existing_folder_are_refused(tiny_pipeline_folder, tmp_path):
    ref = None  # refused before the reference is used
    with pytest.raises(OnnxExportError, match="not StableDiffusion3Pipeline"):
        export_pipeline_onnx(tiny_pipeline_folder("sd3"), tmp_path / "x", ref)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OnnxExportError, match="taken already exists"):
        export_pipeline_onnx(tiny_pipeline_folder("sd"), tmp_path / "taken", ref)
    assert not (tmp_path / "x").exists()
