"""lineas-bake --format hf,onnx on diffusers pipelines (bake.families.diffusers.bake wires in
bake.families.diffusers.onnx)."""

import json

import pytest
from onnx_extra import require_onnx_extra  # noqa: E402

pytest.importorskip("diffusers")
require_onnx_extra()

from tiny_pipelines import random_maps  # noqa: E402

from bake.cli.main import main  # noqa: E402
from bake.formats.onnx import ONNX_REPORT_FILE  # noqa: E402
from lineas.pipelines import load_pipeline  # noqa: E402

SITES = {"sd": ["unet.down_blocks.1.attentions.0.transformer_blocks.0.norm3", "unet.conv_norm_out"],
         "sdxl": ["unet.down_blocks.1.attentions.0.transformer_blocks.1.norm1", "unet.down_blocks.1.resnets.1.norm2"]}


@pytest.mark.parametrize("kind,ort_class", [("sd", "ORTStableDiffusionPipeline"),
                                            ("sdxl", "ORTStableDiffusionXLPipeline")])
def test_cli_bake_with_onnx_checks_the_graphs_in_onnx_runtime(kind, ort_class, tiny_pipeline_folder, tmp_path, capsys):
    import optimum.onnxruntime as ort

    src = tiny_pipeline_folder(kind)
    random_maps(load_pipeline(src), SITES[kind], seed=1).save(tmp_path / "m.safetensors")
    out = tmp_path / "X"
    code = main(["--model", str(src), "--maps", str(tmp_path / "m.safetensors"), "--strength", "0.8",
                 "--format", "hf,onnx", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "pipeline-onnx-denoiser" in printed and "pipeline-onnx-image" in printed and ort_class in printed
    report = json.loads((out / "onnx" / ONNX_REPORT_FILE).read_text())
    assert report["passed"] and all(r["vs_base"] > 100 * r["value"] for r in report["rows"])
    assert (out / "onnx" / "unet" / "model.onnx").is_file()
    assert type(getattr(ort, ort_class).from_pretrained(str(out / "onnx"))).__name__ == ort_class
    card = (out / "README.md").read_text()
    assert "## ONNX" in card and f'{ort_class}.from_pretrained(f"{{path}}/onnx")' in card
    assert json.loads((out / "lineas_provenance.json").read_text())["export"]["onnx"]["folder"] == "onnx"
    assert not list(tmp_path.glob("lineas_tmp_*"))


def test_onnx_for_a_pipeline_optimum_cannot_run_is_refused_before_any_work(tiny_pipeline_folder, tmp_path, capsys):
    src = tiny_pipeline_folder("sd3")
    random_maps(load_pipeline(src), ["transformer.norm_out"], seed=1).save(tmp_path / "m.safetensors")
    code = main(["--model", str(src), "--maps", str(tmp_path / "m.safetensors"), "--format", "hf,onnx",
                 "--out", str(tmp_path / "X")])
    assert code != 0 and "not StableDiffusion3Pipeline" in capsys.readouterr().err
    assert not (tmp_path / "X").exists() and not list(tmp_path.glob("lineas_tmp_*"))
