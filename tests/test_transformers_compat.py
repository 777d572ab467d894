"""What changes between transformers 4.57 and 5.x at lineas-bake's edges: config fields handed from a 5.x
process to a 4.57 one, the SmolLM2 cache, the GGUF conversion, and the ONNX exporter's version conflict.

The version-specific parts pretend to be the other major by patching the one place our code reads the
version (``lineas.config_compat.transformers_version``), so both environments run every test."""

from __future__ import annotations

import json

import pytest
import torch
from bake_fixtures import LLAMA_SITES, setup_model
from tiny import COMMON

from bake.cli.main import EXIT_BAD_INPUT, main
from bake.formats.export import UnknownFormatError, parse_formats
from lineas import config_compat
from lineas.config_compat import legacy_rope_fields, unreadable_by_this_version
from lineas.models import ModelLoadError, _drop_dequantised_quantizer, resolve_model


# ----------------------------------------------------------------------------- config fields
def test_legacy_rope_fields_from_rope_parameters():
    plain = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert legacy_rope_fields(plain) == {"rope_theta": 100000.0, "rope_scaling": None}
    yarn = {"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}
    assert legacy_rope_fields(yarn) == {"rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    per_layer = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                     "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert legacy_rope_fields(per_layer) == {"rope_theta": 1e6, "rope_scaling": None, "rope_local_base_freq": 1e4}
    assert legacy_rope_fields({**plain, "rope_theta": 5.0}) == {}  # already readable by 4.x
    assert legacy_rope_fields({"rope_theta": 5.0}) == {}


def test_an_export_config_carries_the_fields_4x_reads(tmp_path, capsys):
    """Written by this version (5.x: rope_parameters), config.json also says rope_theta, and the export reloads
    with the same rotary settings here."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "rope"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=50000.0)).save_pretrained(model_dir)
    _, maps = setup_model(tmp_path)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--maps", str(maps), "--out", str(out), "--verify-tokens", "2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0
    reloaded = AutoConfig.from_pretrained(out)
    theta = getattr(reloaded, "rope_theta", None) or reloaded.rope_parameters["rope_theta"]
    assert theta == 50000.0


def test_4x_refuses_a_5x_config_it_would_misread(tmp_path, monkeypatch):
    folder = tmp_path / "written-by-5"
    folder.mkdir()
    cfg = {"model_type": "llama", "transformers_version": "5.24.0",
           "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(config_compat, "transformers_version", lambda: "4.57.6")
    assert "rope_theta" in unreadable_by_this_version(cfg)
    with pytest.raises(ModelLoadError, match=r"rope_parameters but not rope_scaling, rope_theta.*4\.57\.6"):
        resolve_model(str(folder))
    monkeypatch.setattr(config_compat, "transformers_version", lambda: "5.24.0")
    assert resolve_model(str(folder)) == str(folder)  # 5.x reads it as written
    cfg["rope_theta"] = 100000.0
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(config_compat, "transformers_version", lambda: "4.57.6")
    assert resolve_model(str(folder)) == str(folder)  # carries both: 4.x reads it too


# ----------------------------------------------------------------------------- the embedded SmolLM2
def test_smollm2_cache_folder_names_the_transformers_major(tmp_path, monkeypatch):
    """A 5.x conversion is never read by 4.x (and back): each major converts into its own folder."""
    from lineas import models

    monkeypatch.setenv("LINEAS_CACHE", str(tmp_path))
    seen = []
    for version in ("4.57.6", "5.24.0"):
        monkeypatch.setattr(config_compat, "transformers_version", lambda v=version: v)
        target = tmp_path / f"SmolLM2-135M-Instruct-v{models.SMOLLM2_CONVERSION}-tf{version[0]}"
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")
        seen.append(models.smollm2_checkpoint())  # a cache hit: nothing is converted
        assert seen[-1] == target
    assert seen[0] != seen[1]


def test_a_leftover_gguf_quantizer_is_removed_after_a_dense_load():
    """transformers 5's GGUF loader can keep its quantizer on a dequantised model; save_pretrained then refuses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**COMMON))
    removed = []

    class LeftoverQuantizer:  # what transformers 5 leaves: hf_quantizer + config.quantization_config
        def remove_quantization_config(self, m):
            removed.append(m)
            del m.hf_quantizer
            del m.config.quantization_config

    model.hf_quantizer = LeftoverQuantizer()
    model.config.quantization_config = {"quant_method": "gguf"}
    _drop_dequantised_quantizer(model)
    assert removed == [model] and not hasattr(model, "hf_quantizer")
    assert getattr(model.config, "quantization_config", None) is None
    packed = LlamaForCausalLM(LlamaConfig(**COMMON))
    packed.model.norm.weight = torch.nn.Parameter(torch.zeros(64, dtype=torch.uint8), requires_grad=False)
    packed.hf_quantizer = LeftoverQuantizer()
    with pytest.raises(ModelLoadError, match="quantised weights"):
        _drop_dequantised_quantizer(packed)


# ----------------------------------------------------------------------------- the ONNX exporter
def test_onnx_under_transformers_5_names_the_conflict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config_compat, "transformers_version", lambda: "5.23.0")
    with pytest.raises(UnknownFormatError, match=r"optimum-onnx 0\.1\.0.*< 4\.58.*transformers 5\.23\.0.*downgrade"):
        parse_formats("hf,onnx")
    assert parse_formats("hf") == ("hf",)
    model_dir, maps = setup_model(tmp_path, sites=LLAMA_SITES)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--maps", str(maps), "--format", "hf,onnx", "--out", str(out)]) \
        == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "transformers 5.23.0" in err and "separate" in err and not out.exists()
