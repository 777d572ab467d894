"""Issue 11's first acceptance line on the real model, in CI: maps learned on the embedded SmolLM2-135M with
the demo's sites and recipe (fewer steps), baked with ``lineas-bake --format hf,gguf``; the f32 GGUF is
loaded by llama.cpp (llama-cpp-python) and its greedy tokens match the hooked model's.

Marked ``gguf`` (``make test-gguf``, CI): needs llama-cpp-python and llama.cpp's converter (``make
setup-gguf``); a few minutes on 2 cores (learning, the bake, the conversion and the llama.cpp check).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gguf

SITES = r"model\.layers\.\d+\.(input|post_attention)_layernorm"  # the demo's sites (lineas.demo)


@pytest.fixture(scope="module")
def demo_maps(tmp_path_factory):
    """``lineas-train`` as the demo runs it (LinEAS, Adam lr 0.002, batch 16, group lasso 0.1), 24 steps."""
    from lineas.cli import main as train

    path = tmp_path_factory.mktemp("smollm2") / "positive.safetensors"
    rc = train(["--model", "smollm2-135m", "--source", "negative", "--target", "positive", "--sites", SITES,
                "--steps", "24", "--lr", "0.002", "--batch-size", "16", "--sparsity-group", "0.1",
                "--out", str(path), "--quiet"])
    assert rc == 0 and path.is_file()
    return path


def test_smollm2_hf_gguf_export_runs_in_llama_cpp_like_the_hooked_model(demo_maps, tmp_path, capsys):
    from bake.cli.main import EXIT_OK, main
    from bake.formats.gguf_greedy import GREEDY_TOKENS, _generate, greedy_prompt_ids
    from lineas.models import load_model

    out = tmp_path / "baked"
    rc = main(["--model", "smollm2-135m", "--maps", str(demo_maps), "--strength", "1.0", "--format", "hf,gguf",
               "--out", str(out)])
    assert rc == EXIT_OK, capsys.readouterr().err
    gguf = out / "gguf" / "model-f32.gguf"
    assert gguf.is_file()

    verification = {c["label"]: c for c in json.loads((out / "lineas_verification.json").read_text())["checks"]}
    f32 = verification["gguf f32 (llama.cpp)"]
    assert f32["gating"] and f32["passed"], f32.get("failures")
    report = json.loads((out / "gguf" / "lineas_gguf_export.json").read_text())["files"]["model-f32.gguf"]
    greedy = report["greedy"]
    assert greedy["prompts"] == 8 and greedy["tokens"] == GREEDY_TOKENS == 32
    assert greedy["identical"] == 8, f"first divergences: {greedy['first_divergence']}"
    # the source with hooks, not the export checked against itself
    assert greedy["reference"].startswith("hooked model")

    # The steering is in the file: llama.cpp's tokens are the hooked model's, and they are not the base model's.
    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    prompts = greedy_prompt_ids(loaded.model, loaded.tokenizer)
    base = _generate(loaded.model, prompts, GREEDY_TOKENS)
    kv = [g for g in f32["greedy"] if g.get("path", "").startswith("llama.cpp kv-cache")]
    assert [g["candidate"] for g in kv] == [g["reference"] for g in kv]
    assert sum(g["candidate"] != b for g, b in zip(kv, base)) >= 1, "the GGUF decodes exactly like the base model"
    card = (out / "README.md").read_text()
    assert "gguf/model-f32.gguf" in card and "| llama.cpp | yes | passed | tested here |" in card
