"""transformers 4.57 and 5.x give the same lineas-train maps, the same baked tensors and the same logits,
and each version loads the other's exports with the same logits.

Needs both environments: ``LINEAS_PYTHON_TF4`` and ``LINEAS_PYTHON_TF5`` name their interpreters
(``make test-cross`` sets them to .venv and .venv-tf5).  Marked ``crossversion`` and left out of the
default run; asked for without the two interpreters it fails, it does not skip.

Cases (tests/cross_version_run.py): a Llama whose norm shifts switch on attention_bias and mlp_bias,
with rope_theta 50 000 (a 5.x config.json must still tell 4.57 that); a Gemma-2 with shift-only affine
modules (remote code); a Gemma whose scaled token embedding is folded into its table.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.crossversion

RUNNER = Path(__file__).resolve().parent / "cross_version_run.py"
ROOT = RUNNER.parent.parent
ARCHS = ("llama", "gemma2", "gemma")


def _python(var: str) -> str:
    exe = os.environ.get(var)
    if not exe:
        pytest.fail(f"{var} is not set: the cross-version test needs both environments (run `make test-cross`)")
    return exe


def _run(exe: str, *args) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([exe, str(RUNNER), *map(str, args)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{exe} {' '.join(map(str, args))} failed:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tf4, tf5 = _python("LINEAS_PYTHON_TF4"), _python("LINEAS_PYTHON_TF5")
    out4, out5 = tmp_path_factory.mktemp("tf4"), tmp_path_factory.mktemp("tf5")
    _run(tf4, "produce", out4)
    _run(tf5, "produce", out5)
    _run(tf4, "reload", out5, out4)
    _run(tf5, "reload", out4, out5)
    v4 = json.loads((out4 / "version.json").read_text())["transformers"]
    v5 = json.loads((out5 / "version.json").read_text())["transformers"]
    assert v4.startswith("4.") and v5.startswith("5."), (v4, v5)
    return out4, out5


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_maps_and_baked_tensors_are_identical(runs, arch):
    out4, out5 = runs
    maps4, maps5 = _tensors(out4 / arch / "maps.safetensors"), _tensors(out5 / arch / "maps.safetensors")
    assert maps4.keys() == maps5.keys() and maps4
    moved = max((maps4[k] - (1.0 if k.endswith(".scale") else 0.0)).abs().max().item() for k in maps4)
    assert moved > 1e-3, "training must move the maps away from the identity for this test to mean anything"
    for k in maps4:
        assert torch.equal(maps4[k], maps5[k]), f"{arch} {k}: max diff {(maps4[k] - maps5[k]).abs().max().item()}"
    baked4, baked5 = _tensors(out4 / arch / "export"), _tensors(out5 / arch / "export")
    assert baked4.keys() == baked5.keys()
    for k in baked4:
        assert torch.equal(baked4[k], baked5[k]), f"{arch} {k}: max diff {(baked4[k] - baked5[k]).abs().max().item()}"


@pytest.mark.parametrize("arch", ARCHS)
def test_each_version_loads_the_others_export_with_identical_logits(runs, arch):
    out4, out5 = runs
    own4 = load_file(str(out4 / arch / "logits.safetensors"))["logits"]
    own5 = load_file(str(out5 / arch / "logits.safetensors"))["logits"]
    assert torch.equal(own4, own5)
    assert torch.equal(load_file(str(out5 / arch / "logits_of_other.safetensors"))["logits"], own4)  # 4.57 -> 5.x
    assert torch.equal(load_file(str(out4 / arch / "logits_of_other.safetensors"))["logits"], own5)  # 5.x -> 4.57


def test_the_cases_cover_biases_affine_modules_and_rope(runs):
    out4, out5 = runs
    llama4 = json.loads((out4 / "llama" / "export" / "config.json").read_text())
    llama5 = json.loads((out5 / "llama" / "export" / "config.json").read_text())
    assert llama4["attention_bias"] is True and llama4["mlp_bias"] is True
    assert llama5["rope_parameters"]["rope_theta"] == 50000.0 and llama5["rope_theta"] == 50000.0
    gemma2 = json.loads((out4 / "gemma2" / "export" / "config.json").read_text())
    assert gemma2["lineas_affine_sites"] and gemma2["auto_map"]
    gemma = json.loads((out5 / "gemma" / "export" / "config.json").read_text())
    assert gemma["tie_word_embeddings"] is False

