"""One guard, one re-bake rule, one report interface for both families (issue 24, item 3): the causal-LM and the
diffusers-pipeline paths refuse the same things the same way."""

from __future__ import annotations

import pytest
import torch
from bake_fixtures import LLAMA_SITES, make_maps, setup_model
from tiny import tiny_model

from bake import FoldError, bake
from bake.cli.main import main
from lineas.maps import SiteMap, SteeringMaps


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ----------------------------------------------------------------------------- the guard, causal LMs
def test_llm_maps_that_zero_every_logit_are_refused_naming_the_site(llama):
    """Scale 0 and shift 0 on the final norm: every hooked logit is 0, and so is every baked one, so a check of
    baked vs hooked alone would pass (max rel 0, greedy identical)."""
    zero = SteeringMaps({"model.norm": SiteMap(torch.zeros(64), torch.zeros(64))}, {"method": "test"})
    with pytest.raises(FoldError) as e:
        bake(llama, zero, strength=1.0, verify_tokens=2)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "all zero" in msg and "first at module 'model.norm'" in msg
    bake(llama, zero, strength=1.0, verify=False)  # no check runs, so no guard: baked as asked


def test_llm_maps_below_the_check_limit_are_refused(llama):
    with pytest.raises(FoldError, match="these maps at this λ change nothing the check can see"):
        bake(llama, make_maps(LLAMA_SITES), strength=1e-9, verify_tokens=2)
    assert bake(llama, make_maps(LLAMA_SITES), strength=1.0, verify_tokens=2).report.passed


def test_cli_llm_maps_below_the_check_limit_exit_2_and_write_nothing(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path)
    out = tmp_path / "out"
    code = main(["--model", str(model_dir), "--maps", f"{maps_path}:1e-9", "--out", str(out), "--verify-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "change nothing the check can see" in err and "does not reproduce" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("lineas_")]


# ----------------------------------------------------------------------------- pipelines
def _pipeline_maps(src, sites, path):
    from tiny_pipelines import random_maps

    from lineas.pipelines import load_pipeline

    random_maps(load_pipeline(src), sites, seed=2).save(path)
    return path


def test_pipeline_rebake_of_the_same_file_at_another_strength_is_refused(tiny_pipeline_folder, tmp_path, capsys):
    """The same maps file at another strength has another effective digest, but steers twice all the same."""
    pytest.importorskip("diffusers")
    src = tiny_pipeline_folder("sd")
    m = _pipeline_maps(src, ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    assert main(["--model", str(src), "--maps", f"{m}:0.8", "--out", str(tmp_path / "X")]) == 0
    capsys.readouterr()
    code = main(["--model", str(tmp_path / "X"), "--maps", f"{m}:0.5", "--out", str(tmp_path / "Y")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "already baked" in err and "sha256" in err and not (tmp_path / "Y").exists()
    assert main(["--model", str(tmp_path / "X"), "--maps", f"{m}:0.5", "--out", str(tmp_path / "Y"),
                 "--allow-rebake"]) == 0


def test_pipeline_onnx_verification_failure_exits_3_without_a_traceback(tiny_pipeline_folder, tmp_path, capsys,
                                                                       monkeypatch):
    pytest.importorskip("diffusers")
    from onnx_extra import require_onnx_extra

    require_onnx_extra()
    import bake.families.diffusers.onnx as pipeline_onnx

    real = pipeline_onnx._denoise_ort
    monkeypatch.setattr(pipeline_onnx, "_denoise_ort", lambda unet, inputs: real(unet, inputs) + 1.0)
    src = tiny_pipeline_folder("sd")
    m = _pipeline_maps(src, ["unet.conv_norm_out"], tmp_path / "m.safetensors")
    code = main(["--model", str(src), "--maps", f"{m}:0.8", "--format", "hf,onnx", "--out", str(tmp_path / "X")])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "verification failed" in err and "pipeline-onnx-denoiser" in err and "FAIL" in err  # main returned
    assert not (tmp_path / "X").exists() and not list(tmp_path.glob("lineas_tmp_*"))


# ----------------------------------------------------------------------------- the protocols
def test_both_families_implement_the_family_protocol(tiny_pipeline_folder, tmp_path):
    pytest.importorskip("diffusers")
    from bake.families.base import Family, FamilyKind
    from bake.families.causal_lm import CAUSAL_LM
    from bake.families.detect import detect, other_options
    from bake.families.diffusers.family import DIFFUSERS_PIPELINE

    for fam in (CAUSAL_LM, DIFFUSERS_PIPELINE):
        for member in Family.__annotations__:
            assert hasattr(fam, member), (fam, member)
        assert callable(fam.recognises) and callable(fam.reference)
    model_dir, _ = setup_model(tmp_path)
    assert detect(tiny_pipeline_folder("sd")) is DIFFUSERS_PIPELINE and DIFFUSERS_PIPELINE.kind is \
        FamilyKind.DIFFUSERS_PIPELINE
    assert detect(model_dir) is CAUSAL_LM and detect(None) is CAUSAL_LM and detect("smollm2-135m") is CAUSAL_LM
    assert other_options(CAUSAL_LM) == DIFFUSERS_PIPELINE.options and other_options(DIFFUSERS_PIPELINE) == \
        CAUSAL_LM.options


def _check_report_protocol(report) -> None:
    from bake.errors import VerificationError

    for member in ("passed", "to_table", "failure_details"):
        assert hasattr(report, member), (type(report).__name__, member)
    assert isinstance(report.failure_details(), str)
    assert VerificationError("x", report=report).report is report


def _failed_row():
    from bake.families.diffusers.verify import Row

    return Row(check="denoiser", tolerance="pipeline-onnx-denoiser", metric="max_rel", value=1.0, limit=1e-4,
               vs_base=2.0, passed=False)


def test_every_report_implements_the_report_protocol():
    from bake.families.diffusers.verify import PipelineReport
    from bake.verify.report import VerificationReport

    llm, pipeline = VerificationReport(), PipelineReport(rows=(_failed_row(),), steps=2, seed=0)
    for r in (llm, pipeline):
        _check_report_protocol(r)
    assert "per-module divergence" in llm.failure_details()


def test_the_pipeline_onnx_report_implements_the_report_protocol():
    from onnx_extra import require_onnx_extra

    require_onnx_extra()
    from bake.families.diffusers.onnx import OnnxPipelineReport

    report = OnnxPipelineReport(folder="onnx", pipeline_class="StableDiffusionPipeline",
                                ort_class="ORTStableDiffusionPipeline", provider="CPUExecutionProvider", files=(),
                                export_seconds=0.0, rows=(_failed_row(),))
    _check_report_protocol(report)
    assert "FAIL" in report.failure_details()
