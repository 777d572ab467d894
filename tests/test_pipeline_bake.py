"""lineas-bake on diffusers pipeline folders: acceptance (plain diffusers reloads the hooked pipeline),
byte-for-byte copies, refusals that write nothing, and a wrong fold caught by verification."""

import hashlib
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import random_maps  # noqa: E402

from bake.cli.main import main  # noqa: E402
from bake.families.diffusers.verify import denoiser_inputs, run_denoiser, run_image  # noqa: E402
from lineas.hooks import attach_maps  # noqa: E402
from lineas.maps import SteeringMaps  # noqa: E402
from lineas.pipelines import PIPELINE_CLASS_KEY, denoiser_name, load_pipeline, pipeline_modules  # noqa: E402

# Per kind: sites covering GroupNorm, affine LayerNorm, Linear/Conv producers (UNets) and every AdaLN class.
SITES = {
    "sd": ["unet.down_blocks.1.resnets.0.norm1", "unet.down_blocks.1.attentions.0.norm",
           "unet.down_blocks.1.attentions.0.transformer_blocks.0.norm3",
           "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
           "unet.down_blocks.1.attentions.0.proj_in", "unet.conv_norm_out"],
    "sdxl": ["unet.down_blocks.1.resnets.1.norm2", "unet.down_blocks.1.attentions.0.transformer_blocks.1.norm1",
             "unet.down_blocks.1.attentions.0.transformer_blocks.1.norm2", "unet.up_blocks.0.attentions.0.proj_out",
             "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
             "text_encoder_2.text_model.encoder.layers.0.mlp.fc2"],  # a transformers component too
    "sd3": ["transformer.transformer_blocks.0.norm1", "transformer.transformer_blocks.0.norm1_context",
            "transformer.transformer_blocks.0.norm2_context", "transformer.transformer_blocks.1.norm1_context",
            "transformer.transformer_blocks.1.norm2", "transformer.norm_out"],
    "flux": ["transformer.transformer_blocks.0.norm1", "transformer.transformer_blocks.0.norm1_context",
             "transformer.transformer_blocks.0.norm2", "transformer.transformer_blocks.0.norm2_context",
             "transformer.single_transformer_blocks.0.norm", "transformer.norm_out"],
}


def _sha(folder):
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _outputs(pipe, maps=None, strength=0.8):
    handle = attach_maps(pipeline_modules(pipe), maps, strength) if maps is not None else None
    try:
        den = pipe.components[denoiser_name(pipe)]
        return run_denoiser(pipe, denoiser_inputs(den, seed=3)), run_image(pipe, seed=5, steps=2)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("kind", list(SITES))
def test_cli_bake_reloads_as_the_hooked_pipeline_with_plain_diffusers(kind, tiny_pipeline_folder, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    src = tiny_pipeline_folder(kind)
    before = _sha(src)
    pipe = load_pipeline(src)
    maps = random_maps(pipe, SITES[kind], seed=1)
    maps.save(tmp_path / "m.safetensors")
    out = tmp_path / "X"
    code = main(["--model", str(src), "--maps", str(tmp_path / "m.safetensors"), "--strength", "0.8",
                 "--out", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, printed
    assert "0 affine modules" in printed and "pipeline-image-float32" in printed
    assert "Loading pipeline components" not in captured.err  # no diffusers bars off a terminal
    base_den, base_img = _outputs(pipe)
    hooked_den, hooked_img = _outputs(pipe, maps)
    assert (hooked_den - base_den).abs().max() > 1e-3 and (hooked_img - base_img).abs().max() > 1e-3
    baked = DiffusionPipeline.from_pretrained(str(out))  # plain diffusers, default dtype, no hooks
    baked.set_progress_bar_config(disable=True)
    baked_den, baked_img = _outputs(baked)
    rel = ((baked_den - hooked_den).abs().flatten(1).amax(1) / hooked_den.abs().flatten(1).amax(1)).max()
    assert rel <= 1e-5, float(rel)
    assert (baked_img - hooked_img).abs().max() <= 1e-4
    # the rewritten components' files hold the same tensors in the same order, only the folded ones changed;
    # every other file is the base pipeline's, byte for byte
    from safetensors import safe_open

    provenance = json.loads((out / "lineas_provenance.json").read_text())
    rewritten = provenance["export"]["components_baked"]
    assert denoiser_name(pipe) in rewritten and set(rewritten) == {s.split(".")[0] for s in SITES[kind]}
    assert _sha(src) == before
    written = _sha(out)
    for name, digest in before.items():
        if name.split("/")[0] not in rewritten:
            assert written[name] == digest, name
    folded = {t for p in provenance["plan"]["sites"] for step in p["steps"] for t in step["tensors"]}
    for component in rewritten:
        for weights in sorted((src / component).glob("*.safetensors")):
            rel = f"{component}/{weights.name}"
            assert written[rel] != before[rel]
            with safe_open(str(weights), "pt") as a, safe_open(str(out / rel), "pt") as b:
                assert list(a.keys()) == list(b.keys())
                for key in a.keys():
                    same = torch.equal(a.get_tensor(key), b.get_tensor(key))
                    assert same != (f"{component}.{key}" in folded), key
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: text-to-image" in card
    assert f"base_model: {json.dumps(str(src))}" in card
    plan_table = printed.split("\n\n")[0]  # the fold table the CLI printed, then the verification table
    assert plan_table.strip() in card and all(s in plan_table for s in SITES[kind])
    assert "pipeline-denoiser-float32" in card and "pipeline-image-float32" in card
    verification = json.loads((out / "lineas_verification.json").read_text())
    assert verification["passed"] and len(verification["rows"]) == 2
    assert not list(tmp_path.glob("lineas_tmp_*"))


def _maps_file(pipe, sites, path, **meta):
    maps = random_maps(pipe, sites, seed=2)
    SteeringMaps(maps.maps, {**maps.metadata, **meta}).save(path)
    return path


def test_a_site_that_does_not_fold_is_refused_and_nothing_is_written(tiny_pipeline_folder, tmp_path, capsys):
    src = tiny_pipeline_folder("flux")
    pipe = load_pipeline(src)
    # a shift on a per-head RMSNorm: its output feeds q.k, there is no bias to take it
    site = "transformer.transformer_blocks.0.attn.norm_q"
    m = _maps_file(pipe, [site, "transformer.norm_out"], tmp_path / "m.safetensors")
    code = main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X")])
    err = capsys.readouterr().err
    assert code == 2
    assert site in err and "no standard loading path" in err
    assert not (tmp_path / "X").exists() and not list(tmp_path.glob("lineas_tmp_*"))
    assert main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X"), "--require-standard"]) == 2
    assert "no standard loading path" in capsys.readouterr().err and not (tmp_path / "X").exists()
    assert main(["--model", str(src), "--maps", str(m), "--dry-run"]) == 2  # the plan is printed, then refused
    captured = capsys.readouterr()
    assert "affine module" in captured.out and "no standard loading path" in captured.err


def test_maps_learned_on_another_pipeline_class_are_refused(tiny_pipeline_folder, tmp_path, capsys):
    src = tiny_pipeline_folder("sd")
    pipe = load_pipeline(src)
    m = _maps_file(pipe, ["unet.conv_norm_out"], tmp_path / "m.safetensors", **{PIPELINE_CLASS_KEY: "FluxPipeline"})
    assert main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X")]) == 2
    assert "FluxPipeline" in capsys.readouterr().err and not (tmp_path / "X").exists()
    assert main(["--model", str(src), "--maps", str(m), "--dry-run"]) == 2  # the dry run checks the same
    assert main(["--model", str(src), "--maps", str(m), "--dry-run", "--ignore-model-mismatch"]) == 0
    assert "unet.conv_norm_out" in capsys.readouterr().out


def test_a_wrong_adaln_convention_fails_verification_and_writes_nothing(tiny_pipeline_folder, tmp_path, capsys,
                                                                       monkeypatch):
    import dataclasses

    import bake.plan.diffusers as pp
    from bake.registry.diffusers import load_pipeline_registry

    reg = load_pipeline_registry()
    # AdaLayerNormContinuous chunks (scale, shift); pretend it were (shift, scale) like the Zero norms
    wrong = tuple(dataclasses.replace(r, chunks=("shift", "scale")) if r.module_class == "AdaLayerNormContinuous"
                  else r for r in reg.adaln)
    monkeypatch.setattr(pp, "load_pipeline_registry", lambda: dataclasses.replace(reg, adaln=wrong))
    src = tiny_pipeline_folder("sd3")
    m = _maps_file(load_pipeline(src), ["transformer.norm_out"], tmp_path / "m.safetensors")
    code = main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X")])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "pipeline-denoiser-float32" in captured.err and "FAIL" in captured.err
    assert not (tmp_path / "X").exists() and not list(tmp_path.glob("lineas_tmp_*"))


def test_cli_bake_then_push_to_hub(tiny_pipeline_folder, tmp_path, capsys, monkeypatch):
    from hub_server import HubServer, Token, disable_xet, use_endpoint

    src = tiny_pipeline_folder("sd")
    m = _maps_file(load_pipeline(src), ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    token = "hf_test_WRITE_token_0123456789abcdef"
    with HubServer({token: Token("me")}, orgs={}) as hub:
        use_endpoint(monkeypatch, hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", token)
        disable_xet(monkeypatch)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        code = main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X"), "--push-to-hub", "me/sd-x"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        repo = hub.repos["me/sd-x"]
        files = set(repo.commits[repo.branches["main"]].files)
    local = {str(f.relative_to(tmp_path / "X")) for f in (tmp_path / "X").rglob("*") if f.is_file()}
    assert {"model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors"} <= files
    assert files - {".gitattributes"} == local  # the server adds .gitattributes when it creates the repo


def test_stale_weight_variants_of_a_rewritten_component_are_removed(tiny_pipeline_folder, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_pipeline_folder("sd"), src)
    unet = src / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(unet, unet.with_name("diffusion_pytorch_model.fp16.safetensors"))  # loads with variant="fp16"
    m = _maps_file(load_pipeline(src), ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    assert main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X")]) == 0, capsys.readouterr().err
    assert not (tmp_path / "X" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    removed = json.loads((tmp_path / "X" / "lineas_provenance.json").read_text())["export"]["removed_files"]
    assert removed == ["unet/diffusion_pytorch_model.fp16.safetensors"]


def test_the_llm_api_points_a_pipeline_folder_to_bake_pipeline(tiny_pipeline_folder, tmp_path):
    from bake import bake, bake_folder, bake_pipeline
    from bake.api import NotAFolderError

    src = tiny_pipeline_folder("sd")
    m = _maps_file(load_pipeline(src), ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    for fn in (bake, bake_folder):
        with pytest.raises(NotAFolderError, match="bake_pipeline"):
            fn(str(src), m)
    result = bake_pipeline(src, m, strength=0.5, out=tmp_path / "X")
    assert result.report.passed and result.components_baked == ("unet",) and (tmp_path / "X" / "README.md").is_file()


def test_bad_options_and_a_rebake_are_refused_before_writing(tiny_pipeline_folder, tmp_path, capsys):
    src = tiny_pipeline_folder("sd")
    m = _maps_file(load_pipeline(src), ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    for extra, needle in ((["--format", "onnx"], "--format"), (["--dtype", "bfloat16"], "--dtype"),
                          (["--device", "tpu"], "tpu"), (["--verify-steps", "0"], "--verify-steps"),
                          (["--max-memory", "4GiB"], "--max-memory"), (["--untie-embeddings"], "--untie-embeddings"),
                          (["--verify-tokens", "4"], "--verify-tokens"),
                          # given at their causal-LM defaults: still said, not silently ignored
                          (["--verify-tokens", "8"], "--verify-tokens"), (["--max-memory", "auto"], "--max-memory")):
        assert main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X"), *extra]) == 2, extra
        assert needle in capsys.readouterr().err and not (tmp_path / "X").exists()
    assert main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X")]) == 0
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "X"), "--maps", str(m), "--out", str(tmp_path / "Y")]) == 2
    assert "already baked" in capsys.readouterr().err and not (tmp_path / "Y").exists()
    assert main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "Z"), "--no-verify"]) == 0
    assert "Verification was skipped" in (tmp_path / "Z" / "README.md").read_text()
    assert json.loads((tmp_path / "Z" / "lineas_verification.json").read_text())["skipped"]


def test_require_runtime_is_refused_for_a_pipeline(tiny_pipeline_folder, tmp_path, capsys):
    src = tiny_pipeline_folder("sd")
    m = _maps_file(load_pipeline(src), ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    code = main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X"), "--require-runtime", "vllm"])
    assert code == 2 and "--require-runtime vllm" in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_maps_too_weak_for_any_check_to_see_are_refused(tiny_pipeline_folder, tmp_path, capsys):
    """hooked != base is not enough: when the maps move neither output by more than its row's limit, an
    unsteered pipeline would pass as well, so the shared guard (bake.verify.guard, as for causal LMs) refuses
    the maps (exit 2, bad input) before the fold, and nothing is written."""
    src = tiny_pipeline_folder("sd")
    m = _maps_file(load_pipeline(src), ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    code = main(["--model", str(src), "--maps", str(m), "--strength", "1e-7", "--out", str(tmp_path / "X")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "these maps at this λ change nothing the check can see" in err and "an unsteered model would pass" in err
    assert not (tmp_path / "X").exists() and not list(tmp_path.glob("lineas_tmp_*"))


def test_a_bf16_stored_denoiser_is_written_in_float32(tiny_pipeline_folder, tmp_path, capsys):
    """FLUX ships its transformer in bf16: folding into bf16 storage would round the fold (8e-5 relative,
    over the 1e-5 row), so the rewritten component is written in float32, the export's dtype."""
    from safetensors import safe_open

    pipe = load_pipeline(tiny_pipeline_folder("flux"))
    m = _maps_file(pipe, SITES["flux"][:2] + ["transformer.norm_out"], tmp_path / "m.safetensors")
    pipe.transformer.to(torch.bfloat16)
    pipe.save_pretrained(str(tmp_path / "src"))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    with safe_open(str(tmp_path / "src" / weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    code = main(["--model", str(tmp_path / "src"), "--maps", str(m), "--out", str(tmp_path / "X")])
    assert code == 0, capsys.readouterr().err
    with safe_open(str(tmp_path / "X" / weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert json.loads((tmp_path / "X" / "lineas_verification.json").read_text())["passed"]


def test_disk_check_counts_a_bf16_component_the_maps_steer_in_float32(tiny_pipeline_folder, tmp_path, capsys,
                                                                       monkeypatch):
    """The export rewrites a steered bf16 component in float32 (twice its size on disk): a disk with room
    for the folder as it is, but not for that, is refused before any work, naming both sizes."""
    from collections import namedtuple

    import bake.publish.outdir
    from bake.families.diffusers.bake import _export_bytes

    pipe = load_pipeline(tiny_pipeline_folder("flux"))
    m = _maps_file(pipe, SITES["flux"][:2], tmp_path / "m.safetensors")
    pipe.transformer.to(torch.bfloat16)
    src = tmp_path / "src"
    pipe.save_pretrained(str(src))
    as_stored = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    transformer = sum(f.stat().st_size for f in (src / "transformer").glob("*.safetensors"))
    assert _export_bytes(src, {"transformer"}) > as_stored + 0.9 * transformer  # its tensors twice over
    assert _export_bytes(src, {"text_encoder"}) == as_stored  # a float32 component: as it is
    free = int(as_stored * 1.2)  # room for a copy, not for the float32 transformer
    assert free < _export_bytes(src, {"transformer"}) * 1.1
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bake.publish.outdir.shutil, "disk_usage", lambda p: usage(1 << 40, 0, free))
    code = main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X")])
    err = capsys.readouterr().err
    assert code == 2 and "needs about" in err and "free" in err
    assert not (tmp_path / "X").exists()


def test_disk_check_counts_the_onnx_graphs_of_format_hf_onnx(tiny_pipeline_folder, tmp_path, monkeypatch):
    """--format hf,onnx also writes ONNX graphs holding every component's weights in float32: a disk with
    room for the HF export alone is refused before any work (and before the ONNX extra is even needed)."""
    from collections import namedtuple

    from safetensors import safe_open

    import bake.publish.outdir
    from bake import bake_pipeline
    from bake.families.diffusers.bake import _export_bytes
    from bake.publish.outdir import OutputPathError

    pipe = load_pipeline(tiny_pipeline_folder("flux"))
    m = _maps_file(pipe, SITES["flux"][:2], tmp_path / "m.safetensors")
    pipe.transformer.to(torch.bfloat16)
    src = tmp_path / "src"
    pipe.save_pretrained(str(src))
    in_float32 = 0
    for f in src.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            in_float32 += sum(4 * math.prod(st.get_slice(k).get_shape()) for k in st.keys()
                              if st.get_slice(k).get_dtype() in ("F32", "BF16", "F16"))
    hf_only = _export_bytes(src, {"transformer"})
    assert in_float32 > 0
    assert _export_bytes(src, {"transformer"}, onnx=True) == hf_only + in_float32
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bake.publish.outdir.shutil, "disk_usage", lambda p: usage(1 << 40, 0, int(hf_only * 1.2)))
    with pytest.raises(OutputPathError, match="needs about"):
        bake_pipeline(src, m, out=tmp_path / "X", formats=("hf", "onnx"))
    assert not (tmp_path / "X").exists()


def test_a_component_name_that_leaves_the_pipeline_folder_is_refused(tiny_pipeline_folder, tmp_path, capsys):
    """model_index.json names the component folders: a name like '../x' would be read and written outside."""
    src = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_folder("sd"), src)
    m = _maps_file(load_pipeline(src), ["unet.mid_block.resnets.0.norm1"], tmp_path / "m.safetensors")
    index = json.loads((src / "model_index.json").read_text())
    index["../outside"] = index.pop("vae")
    (src / "model_index.json").write_text(json.dumps(index))
    before = _sha(src)
    code = main(["--model", str(src), "--maps", str(m), "--out", str(tmp_path / "X")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "component '../outside' is not a plain file name" in err and "Traceback" not in err
    assert _sha(src) == before and not (tmp_path / "X").exists() and not (tmp_path / "outside").exists()
