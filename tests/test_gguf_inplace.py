"""Baking into a (quantised) GGUF file in place (issue 27): ``lineas-bake --model x.gguf``.

Tiny random models with SmolLM2's tokenizer (llama.cpp's converter takes only tokenizers it knows; Gemma-2's
reads a sentencepiece model, so it gets the 100-piece one tests/test_gguf.py trains), converted
with llama.cpp's converter to f32/q8_0 and quantised with llama.cpp itself (``llama_model_quantize``, in a
process of its own) to the k-quant types; rows are multiples of 256 so the k-quants apply.  Each bake is checked
by the bake itself in llama.cpp (exact on the F32 scratch copy, quantised beside the unsteered pair); the tests
also check that the hooked model differs from the base, that the quantised bytes are the source's, that a
second bake is refused and that a wrong fold fails the exact check.

Marked ``gguf`` (needs llama-cpp-python and the converter: ``make setup-gguf``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gguf import sentencepiece_model  # noqa: F401 - the fixture: Gemma-2's converter reads tokenizer.model

from bake.cli.main import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY, main
from bake.store.gguf_file import GGUFStore
from lineas.maps import SiteMap, SteeringMaps
from lineas.models import resolve_model, smollm2_gguf_path

pytestmark = pytest.mark.gguf

VOCAB = 49152
GEMMA_VOCAB = 128  # the sentencepiece model's 100 pieces, padded by the converter
HIDDEN = 256
# llama.cpp's llama_ftype values (llama.h): the k-quant mixes are made by llama_model_quantize
FTYPES = {"Q4_K_M": 15, "Q5_K_S": 16}
QUANTISE = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); "
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")


def _config(arch: str):
    import transformers as tf

    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    # Gemma-2: transformers' GGUF loader reads neither query_pre_attn_scalar nor the soft-capping values from the
    # file (its defaults: 256, 50, 30), and llama.cpp scales queries by 1/sqrt(head_dim) (all but the 27B): so
    # head_dim 256 and the defaults, as Gemma-2 2B/9B have them; the sliding window (4096) spans every probe
    return {"llama": lambda: tf.LlamaConfig(**kw, tie_word_embeddings=True),
            "qwen2": lambda: tf.Qwen2Config(**kw, tie_word_embeddings=False),
            "gemma2": lambda: tf.Gemma2Config(**{**kw, "vocab_size": GEMMA_VOCAB}, head_dim=256,
                                              query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                              final_logit_softcapping=30.0, sliding_window=4096)}[arch]()


def tiny_gguf(tmp: Path, arch: str, qtype: str, sp_model: Path | None = None) -> Path:
    """A tiny random ``arch`` model as a GGUF file of ``qtype`` (f32, q8_0 or a llama_ftype in FTYPES);
    Gemma-2 with the sentencepiece model ``sp_model`` as its only tokenizer (the checks then run on token ids)."""
    from transformers import AutoModelForCausalLM

    from bake.formats.gguf import convert

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(8.0)  # logits far from ties
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    folder = tmp / f"{arch}-hf"
    model.save_pretrained(folder)
    if arch == "gemma2":
        shutil.copyfile(sp_model, folder / "tokenizer.model")  # for llama.cpp's converter
    else:
        src = resolve_model("smollm2-135m")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(f"{src}/{name}", folder / name)
    base = "q8_0" if qtype == "q8_0" else "f32"
    path = tmp / f"{arch}-{base}.gguf"
    convert(folder, path, base)
    if qtype in FTYPES:
        out = tmp / f"{arch}-{qtype}.gguf"
        subprocess.run([sys.executable, "-c", QUANTISE, str(path), str(out), str(FTYPES[qtype])], check=True,
                       capture_output=True)
        path = out
    shutil.rmtree(folder)
    return path


def write_maps(path: Path, shifted, scaled_only=(), *, seed: int = 0, a: float = 0.3) -> Path:
    g = torch.Generator().manual_seed(seed)
    maps = {s: SiteMap(1 + a * torch.randn(HIDDEN, generator=g), a * torch.randn(HIDDEN, generator=g))
            for s in shifted}
    maps |= {s: SiteMap(1 + a * torch.randn(HIDDEN, generator=g), torch.zeros(HIDDEN)) for s in scaled_only}
    SteeringMaps(maps, {"method": "linear-act"}).save(path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hooked_differs_from_base(gguf: Path, maps: Path, vocab: int = VOCAB) -> None:
    """The maps move the dequantised source model's logits (so baked == hooked is not base == base)."""
    from bake.formats.gguf_inplace_check import dequantised_source
    from lineas.hooks import steered

    model, _ = dequantised_source(gguf, with_tokenizer=False)
    ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        with steered(model, SteeringMaps.load(maps), 1.0):
            hooked = model(ids).logits
    assert (hooked - base).abs().max() > 1e-2 * hooked.abs().max()


def bake_and_check(gguf: Path, maps: Path, out: Path, capsys) -> dict:
    before = sha(gguf)
    rc = main(["--model", str(gguf), "--maps", str(maps), "--out", str(out), "--verify-tokens", "4"])
    assert rc == EXIT_OK, capsys.readouterr().err
    assert sha(gguf) == before  # the source is only read
    baked = out / gguf.name
    src, dst = GGUFStore(gguf), GGUFStore(baked)
    for name, info in src.tensors.items():
        if info.quantised:
            assert dst.info(name).type_name == info.type_name and dst.raw_bytes(name) == src.raw_bytes(name), name
    assert dst.field("lineas.maps_sha256") == [sha(maps)]
    assert dst.field("tokenizer.chat_template") == src.field("tokenizer.chat_template")
    prov = json.loads((out / "lineas_provenance.json").read_text())
    checks = {c["label"]: c for c in json.loads((out / "lineas_verification.json").read_text())["checks"]}
    exact = checks["gguf in place, dequantised to f32 (llama.cpp)"]
    assert exact["gating"] and exact["passed"] and exact["top1"] == 1.0
    steered = checks["gguf in place, quantised (llama.cpp vs hooked)"]
    unsteered = checks["gguf source file, unsteered (llama.cpp vs transformers dequantised)"]
    assert steered["passed"] and not unsteered["gating"]
    assert prov["verification"]["quantised"]["visible_max_rel"] > prov["verification"]["quantised"]["visible_limit"]
    return {"src": src, "dst": dst, "prov": prov, "checks": checks}


@pytest.fixture(scope="module")
def files(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("gguf-inplace")
    cache = {}

    def get(arch: str, qtype: str) -> Path:
        if (arch, qtype) not in cache:
            sp = request.getfixturevalue("sentencepiece_model") if arch == "gemma2" else None
            cache[arch, qtype] = tiny_gguf(tmp, arch, qtype, sp)
        return cache[arch, qtype]

    return get


LLAMA_SHIFTED = ("model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm")
LLAMA_SCALED = ("model.layers.1.input_layernorm", "model.norm")


@pytest.mark.parametrize("qtype", ["Q4_K_M", "q8_0"])
def test_llama_bakes_in_place(files, qtype, tmp_path, capsys):
    gguf = files("llama", qtype)
    maps = write_maps(tmp_path / "maps.safetensors", LLAMA_SHIFTED, LLAMA_SCALED)
    hooked_differs_from_base(gguf, maps)
    got = bake_and_check(gguf, maps, tmp_path / "out", capsys)
    new = {n for n in got["dst"].tensors if n not in got["src"].tensors}
    assert new == {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "blk.1.ffn_gate.bias",
                   "blk.1.ffn_up.bias"}
    assert got["dst"].info("output_norm.weight").type_name == "F32"
    # a second bake of the same maps into the baked file is refused, as for HF exports
    rc = main(["--model", str(tmp_path / "out" / gguf.name), "--maps", str(maps), "--out", str(tmp_path / "again")])
    assert rc == EXIT_BAD_INPUT and "already baked" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_qwen2_q5_k_bakes_into_its_own_biases(files, tmp_path, capsys):
    gguf = files("qwen2", "Q5_K_S")
    maps = write_maps(tmp_path / "maps.safetensors", ("model.layers.0.input_layernorm",),
                      ("model.layers.1.post_attention_layernorm",))
    hooked_differs_from_base(gguf, maps)
    got = bake_and_check(gguf, maps, tmp_path / "out", capsys)
    assert set(got["dst"].tensors) == set(got["src"].tensors)  # qwen2's q/k/v biases exist: updated, none added
    assert not (got["dst"].dequantise("blk.0.attn_q.bias") == got["src"].dequantise("blk.0.attn_q.bias")).all()


# Gemma-2's four norms per layer and the final one, scales only (llama.cpp loads no attention bias for Gemma-2)
GEMMA2_SCALED = (*(f"model.layers.{i}.{n}_layernorm" for i in (0, 1)
                   for n in ("input", "post_attention", "pre_feedforward", "post_feedforward")), "model.norm")


@pytest.fixture
def ids_only(monkeypatch):
    """The bake's reference without the tokenizer transformers builds from the file: the test sentencepiece
    model names its specials <s>/</s>, not Gemma's <bos>/<eos>, so transformers' Gemma converter adds a <bos>
    beyond the 128-entry vocabulary (id 128) and, with no unknown-token id in the file, cannot encode every
    probe.  The checks then run on token ids, as for a file with no tokenizer."""
    import bake.families.gguf_inplace as fam

    real = fam.dequantised_source
    monkeypatch.setattr(fam, "dequantised_source", lambda path, **kw: real(path, **{**kw, "with_tokenizer": False}))


def test_gemma2_q4_k_scale_only_bakes_into_its_stored_1_plus_w(files, tmp_path, capsys):
    """Gemma-2's converter stores each norm's ``1 + w``: the scale multiplies the stored value as it stands,
    checked exactly in llama.cpp (norm weights random, so a wrong convention shows).  Without ``ids_only``: the
    bake itself finds that the file's tokenizer cannot encode the probes within the vocabulary, says so, and
    verifies on token ids."""
    gguf = files("gemma2", "Q4_K_M")
    maps = write_maps(tmp_path / "maps.safetensors", (), GEMMA2_SCALED)
    hooked_differs_from_base(gguf, maps, GEMMA_VOCAB)
    got = bake_and_check(gguf, maps, tmp_path / "out", capsys)
    src, dst = got["src"], got["dst"]
    assert set(dst.tensors) == set(src.tensors)  # nothing new: scales only
    m = SteeringMaps.load(maps)
    for site in GEMMA2_SCALED:
        gname = src.gguf_name(site) + ".weight"
        stored = torch.from_numpy(src.dequantise(gname).copy())
        assert (stored - 1).abs().max() > 0.1  # 1 + w, w random
        assert torch.allclose(torch.from_numpy(dst.dequantise(gname).copy()), m[site].scale * stored, rtol=1e-6,
                              atol=0), gname


def test_gemma2_with_the_hf_1_plus_w_fold_fails_the_exact_check(files, tmp_path, capsys, monkeypatch, ids_only):
    """The HF fold ``s * (1 + w) - 1`` applied to the stored ``1 + w`` (the convention inverted) is caught."""
    import bake.formats.gguf_inplace as fmt

    gguf = files("gemma2", "Q4_K_M")
    maps = write_maps(tmp_path / "maps.safetensors", (), GEMMA2_SCALED)
    real = fmt.fold_norm_scale
    monkeypatch.setattr(fmt, "fold_norm_scale", lambda w, s, one_plus=False: real(w, s, one_plus=True))
    rc = main(["--model", str(gguf), "--maps", str(maps), "--out", str(tmp_path / "out"), "--verify-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == EXIT_VERIFY and "dequantised to f32" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("lineas_tmp_*"))


def test_a_shift_llama_cpp_cannot_load_is_refused_with_the_way_out(files, tmp_path, capsys):
    gguf = files("qwen2", "q8_0")  # qwen2's gate/up have no bias llama.cpp loads
    maps = write_maps(tmp_path / "maps.safetensors", ("model.layers.1.post_attention_layernorm",))
    rc = main(["--model", str(gguf), "--maps", str(maps), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "llama.cpp" in err and "lineas-train" in err and "--require-runtime" in err
    assert not (tmp_path / "out").exists()


def test_a_wrong_fold_fails_the_exact_check_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    import bake.families.gguf_inplace as fam

    gguf = files("llama", "q8_0")
    maps = write_maps(tmp_path / "maps.safetensors", LLAMA_SHIFTED)
    real = fam.fold_into_gguf

    def skip_one_bias(store, plan, eff):
        fold = real(store, plan, eff)
        del fold.values["blk.0.attn_v.bias"]  # one consumer's bias dropped
        fold.new.pop("blk.0.attn_v.bias", None)
        return fold

    monkeypatch.setattr(fam, "fold_into_gguf", skip_one_bias)
    rc = main(["--model", str(gguf), "--maps", str(maps), "--out", str(tmp_path / "out"), "--verify-tokens", "4"])
    assert rc == EXIT_VERIFY, capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("lineas_tmp_*"))


def test_dry_run_lists_the_tensors_and_writes_nothing(files, tmp_path, capsys):
    gguf = files("llama", "q8_0")
    maps = write_maps(tmp_path / "maps.safetensors", LLAMA_SHIFTED, LLAMA_SCALED)
    assert main(["--model", str(gguf), "--maps", str(maps), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "blk.0.attn_q.bias (new, F32)" in out and "output_norm.weight (F32)" in out
    assert main(["--model", str(gguf), "--maps", str(maps), "--format", "onnx"]) == EXIT_BAD_INPUT


SITES = r"model\.layers\.\d+\.(input|post_attention)_layernorm"  # the demo's sites (lineas.demo)


def test_embedded_smollm2_q4_1_bakes_in_place(tmp_path, capsys):
    """The acceptance line: the embedded Q4_1 file with maps learned as the demo learns them (fewer steps)."""
    from lineas.cli import main as train

    maps = tmp_path / "positive.safetensors"
    assert train(["--model", "smollm2-135m", "--source", "negative", "--target", "positive", "--sites", SITES,
                  "--steps", "24", "--lr", "0.002", "--batch-size", "16", "--sparsity-group", "0.1",
                  "--require-runtime", "llama.cpp", "--out", str(maps), "--quiet"]) == 0
    gguf = smollm2_gguf_path()
    hooked_differs_from_base(gguf, maps)
    got = bake_and_check(gguf, maps, tmp_path / "out", capsys)
    copied = got["prov"]["export"]["tensors"]["copied"]
    assert got["prov"]["verification"]["bytes_identical"]["identical"] == copied >= 210  # every Q4_1/Q8_0 matrix
    print(json.dumps({k: {m: c[m] for m in ("max_rel", "mean_kl", "top1", "greedy_matched", "greedy_total")}
                      for k, c in got["checks"].items()}, indent=1))
