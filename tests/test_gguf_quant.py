"""llama.cpp k-quant exports (``--format gguf-q4_k_m``, ``gguf-q5_k_m``, ``gguf-q6_k``): llama.cpp's own quantiser
on the verified f32 GGUF file, checked in llama.cpp in a pair with the base model quantised the same way.

The tests marked ``gguf`` need llama-cpp-python, the converter and the gguf package (``make setup-gguf``; ``make
test-gguf`` runs them).  The first test is not marked: the request check needs none of them.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from bake.formats.kinds import FormatRequestError, check_request, export_bytes, export_order

VOCAB = 49152  # SmolLM2's tokenizer (llama.cpp's converter only takes tokenizers it knows)
SITES = ("model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm")  # -> q/k/v, gate/up
KQUANTS = ("gguf-q4_k_m", "gguf-q5_k_m", "gguf-q6_k")


def test_a_k_quant_without_the_f32_gguf_it_quantises_is_refused_naming_the_fix():
    for fmt in KQUANTS:
        with pytest.raises(FormatRequestError, match=rf"--format {fmt} quantises the verified f32 GGUF file.*"
                                                     rf"add gguf \(--format gguf,hf,{fmt}\)"):
            check_request(["hf", fmt], "float32")
        with pytest.raises(FormatRequestError, match=rf"add hf, gguf \(--format hf,gguf,{fmt}\)"):
            check_request([fmt], "float32")
        with pytest.raises(FormatRequestError, match="--dtype bfloat16"):
            check_request(["hf", "gguf", fmt], "bfloat16")
        check_request(["hf", "gguf", fmt], "float32")
        assert export_order([fmt, "gguf", "hf"]) == ["hf", "gguf", fmt]  # quantised after the f32 file exists
    n = 1_000_000  # the size estimate: hf f32 + gguf f32 + each k-quant (bits per weight, fallbacks included)
    assert export_bytes(n, 4, ["hf", "gguf", "gguf-q4_k_m"]) == int(n * (4 + 4 + 6.5 / 8) * 1.05)
    assert export_bytes(n, 4, ["hf", "gguf", "gguf-q6_k"]) == int(n * (4 + 4 + 8.5 / 8) * 1.05)


# ----------------------------------------------------------------------------- llama.cpp (marker gguf)
def tiny_256(folder, seed: int = 0):
    """A tiny random llama whose matrices' rows are multiples of 256 (k-quant blocks fit every one), with
    SmolLM2's tokenizer, saved to ``folder``."""
    import transformers as tf

    from lineas.models import resolve_model

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(8.0)  # logits far from ties
    model.save_pretrained(folder)
    src = resolve_model("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(f"{src}/{name}", folder / name)
    return model.eval()


@pytest.fixture(scope="module")
def baked_q4(tmp_path_factory):
    from bake_fixtures import write_maps

    from bake.cli.main import EXIT_OK, main
    from lineas.maps import SteeringMaps

    tmp = tmp_path_factory.mktemp("gguf_quant")
    model = tiny_256(tmp / "tiny")
    maps = write_maps(tmp / "maps.safetensors", SITES, dim=256, magnitude=0.5)
    out = tmp / "out"
    rc = main(["--model", str(tmp / "tiny"), "--maps", str(maps), "--out", str(out),
               "--format", "hf,gguf,gguf-q4_k_m", "--verify-tokens", "4"])
    assert rc == EXIT_OK
    return model, SteeringMaps.load(maps), out


@pytest.mark.gguf
def test_q4_k_m_is_llama_cpps_own_q4_k_and_q6_k_and_loads_in_llama_cpp(baked_q4):
    from gguf import GGUFReader

    from bake.formats.llamacpp import load_llamacpp

    _, _, out = baked_q4
    path = out / "gguf" / "model-q4_k_m.gguf"
    assert path.is_file() and (out / "gguf" / "model-f32.gguf").is_file()
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    matrices = {n: t for n, t in types.items() if n.endswith(".weight") and "norm" not in n}
    assert set(matrices.values()) == {"Q4_K", "Q6_K"}, matrices  # every row a multiple of 256: no fallback
    assert matrices["token_embd.weight"] == "Q6_K" and matrices["blk.0.attn_q.weight"] == "Q4_K"
    assert {t for n, t in types.items() if "norm" in n} == {"F32"}
    row = json.loads((out / "gguf" / "lineas_gguf_export.json").read_text())["files"]["model-q4_k_m.gguf"]
    assert row["outtype"] == "q4_k_m" and row["quantised_from"] == "model-f32.gguf"
    assert row["ftype"] == "LLAMA_FTYPE_MOSTLY_Q4_K_M" and row["fallbacks"] == {}
    assert not row["quantiser_torch_loaded"]  # llama.cpp's quantiser ran in a process without torch
    assert set(row["tensor_types"]["by_type"]) == {"F32", "Q4_K", "Q6_K"}
    assert 4.5 <= row["tensor_types"]["bits_per_weight"] <= 6.6
    with load_llamacpp(path) as llm:
        assert not llm.torch_loaded and llm.n_vocab() == VOCAB
        assert llm.logits([5, 6, 7]).shape == (3, VOCAB)


@pytest.mark.gguf
def test_both_pairs_are_reported_steered_vs_hooked_and_base_vs_base(baked_q4):
    _, _, out = baked_q4
    checks = {c["label"]: c for c in json.loads((out / "lineas_verification.json").read_text())["checks"]}
    steered = checks["gguf q4_k_m (llama.cpp): steered file vs hooked model"]
    base = checks["gguf q4_k_m (llama.cpp): base model's file vs base model"]
    for c in (steered, base):
        assert not c["gating"] and c["tolerance"]["name"] == "gguf-q4_k_m"
        assert 0.0 < c["top1"] <= 1.0 and 0.0 < c["mean_kl"] < 1.0 and math.isfinite(c["max_rel"])
        assert c["greedy_total"] == 3
    pairs = json.loads((out / "gguf" / "lineas_gguf_export.json").read_text())["files"]["model-q4_k_m.gguf"]["pairs"]
    assert pairs["steered_vs_hooked"]["measured"] and pairs["base_vs_base"]["measured"]
    assert pairs["steered_vs_hooked"]["mean_kl"] == steered["mean_kl"]
    assert pairs["base_vs_base"]["mean_kl"] == base["mean_kl"]
    assert pairs["base_vs_base"]["reference"].startswith("base model (the source checkpoint without hooks)")
    assert set(pairs["base_vs_base"]["tensor_types"]["by_type"]) == {"F32", "Q4_K", "Q6_K"}
    card = (out / "README.md").read_text()
    assert "steered file vs hooked model" in card and "base model's file vs base model" in card
    assert "gguf/model-q4_k_m.gguf" in card and "what the quantisation alone costs" in card
    assert not [p for p in out.parent.iterdir() if p.name.startswith("lineas_")]  # no scratch left beside it


@pytest.mark.gguf
def test_the_q4_k_m_file_carries_the_steering(baked_q4):
    """Hooked and base differ, and the quantised steered file is closer to the hooked model than to the base."""
    from bake.formats.llamacpp import llamacpp_runner, load_llamacpp
    from lineas.hooks import steered

    model, maps, out = baked_q4
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = model(ids).logits[0]
        with steered(model, maps, 1.0):
            hooked = model(ids).logits[0]
    assert (hooked - base).abs().max() > 1e-2 * hooked.abs().max()
    with load_llamacpp(out / "gguf" / "model-q4_k_m.gguf") as llm:
        got = llamacpp_runner(llm)(ids, torch.ones_like(ids))[0]
    assert (got - hooked).norm() < (got - base).norm()


@pytest.mark.gguf
def test_an_in_memory_bake_reports_the_base_pair_as_not_measured(tmp_path):
    from bake_fixtures import write_maps
    from transformers import AutoTokenizer

    from bake import bake
    from lineas.maps import SteeringMaps

    model = tiny_256(tmp_path / "tiny")
    maps = SteeringMaps.load(write_maps(tmp_path / "m.safetensors", SITES, dim=256, magnitude=0.5))
    baked = bake(model, maps, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tiny"), verify_tokens=4)
    out = baked.save_pretrained(tmp_path / "out", formats="hf,gguf,gguf-q6_k")
    row = json.loads((out / "gguf" / "lineas_gguf_export.json").read_text())["files"]["model-q6_k.gguf"]
    assert row["pairs"]["steered_vs_hooked"]["measured"]
    assert row["pairs"]["base_vs_base"] == {"measured": False, "reason": row["pairs"]["base_vs_base"]["reason"]}
    assert "in-memory bake" in row["pairs"]["base_vs_base"]["reason"]
    labels = [c["label"] for c in json.loads((out / "lineas_verification.json").read_text())["checks"]]
    assert "gguf q6_k (llama.cpp): steered file vs hooked model" in labels
    assert not any("base model's file" in label for label in labels)
    assert "was not measured (an in-memory bake" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------- SmolLM2-135M (marker gguf)
SMOLLM2_SITES = [f"model.layers.{i}.{n}" for i in range(30) for n in ("input_layernorm", "post_attention_layernorm")]
# llama.cpp's fallbacks for SmolLM2's rows of 576 (not a multiple of 256): what each k-quant becomes there
FALLBACK = {"q4_k_m": ("q4_K->q5_0", "Q5_0"), "q5_k_m": ("q5_K->q5_1", "Q5_1"), "q6_k": ("q6_K->q8_0", "Q8_0")}


@pytest.mark.gguf
def test_smollm2_k_quants_fall_back_on_rows_of_576_and_report_both_pairs(tmp_path):
    """SmolLM2-135M (hidden 576, intermediate 1536) steered on the demo's 60 norm sites, exported as q4_k_m, q5_k_m
    and q6_k: the matrices whose rows are 576 wide get llama.cpp's fallback type, ffn_down (1536) the k-quant.  Both
    pairs are measured; the steered check warns exactly when its KL is more than twice the base pair's (these random
    maps on every norm made the steered model lose 2.5-4.5x more than the base model, learned maps 0.7x).  About
    5 minutes on 2 busy cores."""
    from bake_fixtures import write_maps
    from gguf import GGUFReader

    from bake.cli.main import EXIT_OK, main

    maps = write_maps(tmp_path / "maps.safetensors", SMOLLM2_SITES, dim=576, magnitude=0.1)
    out = tmp_path / "baked"
    rc = main(["--model", "smollm2-135m", "--maps", str(maps), "--out", str(out),
               "--format", "hf,gguf,gguf-q4_k_m,gguf-q5_k_m,gguf-q6_k"])
    assert rc == EXIT_OK
    files = json.loads((out / "gguf" / "lineas_gguf_export.json").read_text())["files"]
    checks = {c["label"]: c for c in json.loads((out / "lineas_verification.json").read_text())["checks"]}
    for outtype, (fallback, fallback_type) in FALLBACK.items():
        row = files[f"model-{outtype}.gguf"]
        assert row["fallbacks"].get(fallback, 0) > 0, row["fallbacks"]
        types = {t.name: t.tensor_type.name for t in GGUFReader(str(out / "gguf" / f"model-{outtype}.gguf")).tensors}
        assert types["blk.0.attn_q.weight"] == fallback_type  # 576 wide
        assert types["blk.0.ffn_down.weight"] in ("Q4_K", "Q5_K", "Q6_K")  # 1536 wide: the k-quant itself
        steered, base = row["pairs"]["steered_vs_hooked"], row["pairs"]["base_vs_base"]
        assert steered["measured"] and base["measured"]
        assert 0.0 < steered["mean_kl"] < 10 and 0.0 < steered["top1"] <= 1.0
        assert 0.0 < base["mean_kl"] < 0.25 and 0.7 < base["top1"] <= 1.0  # the base model's own loss (its row)
        assert base["fallbacks"] == row["fallbacks"]  # the same tensors fell back in both files
        hooked = checks[f"gguf {outtype} (llama.cpp): steered file vs hooked model"]
        assert not hooked["gating"] and not checks[base["label"]]["gating"]
        warned = any("than the base model does" in f for f in hooked["failures"])
        assert warned == (steered["mean_kl"] > 2 * base["mean_kl"]), (steered, base)
    assert checks["gguf f32 (llama.cpp)"]["passed"]
