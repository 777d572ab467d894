"""The runtime-compatibility matrix: registry facts, verdicts, --dry-run, the card, --require-runtime.

What llama.cpp itself does with the files is tested in tests/test_gguf.py (needs llama-cpp-python).
"""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
from bake_fixtures import GEMMA2_SITES, NO_LLAMA_CPP_FACT, setup_model

from bake.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from bake.plan.runtimes import Evidence, Runtime, Serves
from bake.registry.llm import RegistryError, load_registry, parse_entry

GEMMA2_QKV_SITES = ("model.layers.0.input_layernorm", "model.layers.1.input_layernorm")  # shifts -> q/k/v biases
LLAMA_FLAG_SITES = ("model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm")


def _raw(model_type: str) -> dict:
    path = resources.files("bake.registry").joinpath("archs", f"{model_type}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _plan(tmp_path, arch, sites):
    from bake.api import bake_folder

    model_dir, maps_path = setup_model(tmp_path, arch, sites)
    return bake_folder(str(model_dir), str(maps_path), plan_only=True)


def _verdicts(plan) -> dict:
    return {v.runtime: v for v in plan.runtimes}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["runtimes"].update(ollama={"architecture": "x", "bias_flags_served": [], "source": "y"}),
     "unknown runtime"),
    (lambda d: d["runtimes"]["llama.cpp"].update(bias_flags_served=["qkv_bias"]), "not among this entry's bias_flags"),
    (lambda d: d["runtimes"]["llama.cpp"].update(source=" "), "cite the runtime's source"),
    (lambda d: d["runtimes"]["vllm"].pop("source"), r"missing key\(s\) \['source'\]"),
    (lambda d: d["runtimes"]["tgi"].update(loads="all"), "unknown key"),
])
def test_registry_runtime_facts_are_validated(mutate, message):
    data = copy.deepcopy(_raw("llama"))
    mutate(data)
    with pytest.raises(RegistryError, match=message):
        parse_entry(data, "test")


def test_every_recorded_fact_cites_a_source_file():
    for entry in load_registry().values():
        # every registry architecture is recorded, but those llama.cpp's converter cannot convert (no fact to test)
        assert (Runtime.LLAMA_CPP in entry.runtimes) != (entry.model_type in NO_LLAMA_CPP_FACT), entry.model_type
        for name, fact in entry.runtimes.items():
            assert ".py" in fact.source or ".cpp" in fact.source, (entry.model_type, name)


def test_llama_with_both_bias_flags_is_served_everywhere(tmp_path):
    plan = _plan(tmp_path, "llama", LLAMA_FLAG_SITES)
    assert {c.key for c in plan.config_changes} == {"attention_bias", "mlp_bias"}  # the flags are really on
    v = _verdicts(plan)
    assert all(x.serves is Serves.YES for x in v.values()), [x.to_dict() for x in v.values()]
    assert v[Runtime.LLAMA_CPP].evidence is Evidence.TESTED and v[Runtime.VLLM].evidence is Evidence.TESTED
    assert v[Runtime.MLX].evidence is Evidence.TESTED and v[Runtime.TGI].evidence is Evidence.SOURCE
    assert "src/models/llama.cpp" in v[Runtime.LLAMA_CPP].source


def test_gemma2_attention_bias_is_refused_where_the_source_says_so(tmp_path):
    plan = _plan(tmp_path, "gemma2", GEMMA2_QKV_SITES)
    assert [c.key for c in plan.config_changes] == ["attention_bias"] and not plan.affine_sites
    v = _verdicts(plan)
    assert v[Runtime.TRANSFORMERS].serves is Serves.YES
    assert v[Runtime.VLLM].serves is Serves.YES  # Gemma2Attention: bias=config.attention_bias
    assert v[Runtime.LLAMA_CPP].serves is Serves.NO and "attention_bias" in v[Runtime.LLAMA_CPP].reason
    assert "gemma2.cpp" in v[Runtime.LLAMA_CPP].source
    assert v[Runtime.TGI].serves is Serves.NO


def test_affine_modules_need_custom_code_except_in_onnx(tmp_path):
    plan = _plan(tmp_path, "gemma2", GEMMA2_SITES)
    assert plan.affine_sites
    v = _verdicts(plan)
    assert v[Runtime.ONNX_RUNTIME].serves is Serves.YES
    for r in (Runtime.TRANSFORMERS, Runtime.LLAMA_CPP, Runtime.VLLM, Runtime.TGI):
        assert v[r].serves is Serves.NO and GEMMA2_SITES[0] in v[r].reason, r


def test_dry_run_prints_the_matrix(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_QKV_SITES)
    assert main(["--model", str(model_dir), "--maps", str(maps_path), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "runtimes (does the export load without custom code?)" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in {r.value for r in Runtime}}
    assert rows == {"transformers": "yes", "onnxruntime": "yes", "llama.cpp": "no", "vllm": "yes", "mlx": "no",
                    "tgi": "no"}  # mlx_lm/models/gemma2.py: every projection bias=False


def test_require_runtime_refuses_before_work_naming_sites(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    out = tmp_path / "x"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out),
               "--require-runtime", "llama.cpp"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT
    for site in GEMMA2_SITES:
        assert site in err
    assert "lineas-train --foldable" in err and "llama.cpp: no" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("lineas_tmp_")]


def test_require_runtime_passes_a_plan_it_serves(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "llama", LLAMA_FLAG_SITES)
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--dry-run", "--require-runtime", "llama.cpp",
               "--require-runtime", "vllm"])
    assert rc == EXIT_OK, capsys.readouterr().err


def test_require_runtime_mlx_refuses_a_bias_mlx_does_not_load(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_QKV_SITES)
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--dry-run", "--require-runtime", "mlx"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "mlx: no" in err and "attention_bias" in err and "mlx_lm/models/gemma2.py" in err


def test_unknown_runtime_is_named(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "llama", LLAMA_FLAG_SITES)
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--dry-run", "--require-runtime", "ollama"])
    assert rc == EXIT_BAD_INPUT and "'ollama'" in capsys.readouterr().err


def test_card_and_provenance_carry_the_matrix(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_QKV_SITES)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out),
                 "--verify-tokens", "2"]) == EXIT_OK, capsys.readouterr().err
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Runtimes" in card and "| llama.cpp | no | no | tested here |" in card
    assert "| transformers | yes | passed | tested here |" in card  # the export's reload check ran transformers
    assert "src/models/gemma2.cpp" in card and "read from source" in card
    prov = json.loads((out / "lineas_provenance.json").read_text(encoding="utf-8"))
    assert json.dumps(prov).count('"runtime": "vllm"') == 1


def test_optimum_exports_every_registry_model_type():
    """The ONNX Runtime verdict relies on it for every architecture with a registry entry, except those whose entry
    says ``"onnx_export": false`` (and those, it must not export)."""
    from onnx_extra import require_onnx_extra

    require_onnx_extra()
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    for model_type, entry in load_registry().items():
        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx",
                                                                    library_name="transformers")
        except KeyError:  # "... is not supported yet for transformers"
            tasks = {}
        assert ("text-generation-with-past" in tasks) == entry.onnx_export, model_type


def test_no_registry_entry_means_unknown_not_yes():
    from bake.plan.runtimes import runtime_matrix

    v = {x.runtime: x for x in runtime_matrix(model_type="mamba", registry=None, affine_sites=(), config_changes=())}
    assert v[Runtime.TRANSFORMERS].serves is Serves.YES
    assert all(v[r].serves is Serves.UNKNOWN for r in (Runtime.ONNX_RUNTIME, Runtime.LLAMA_CPP, Runtime.VLLM,
                                                       Runtime.TGI))
