"""``--model OWNER/NAME``: a Hub checkpoint is fetched into the Hugging Face cache (only what a bake reads)
and baked from there out of core, like a local folder; a Hub pipeline goes to the pipeline family.

No internet: tests/hub_server.py, a Hub look-alike on 127.0.0.1, answers the real huggingface_hub client
(and diffusers' ``DiffusionPipeline.download``); the CLI runs in a fresh process with ``HF_ENDPOINT`` and
``HF_HOME`` set, as a user's would.
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
from bake_fixtures import LLAMA_SITES, hooked_and_base, logits, make_maps
from hub_server import HubServer, Token, disable_xet, use_endpoint
from tiny import tiny_model

from bake.cli.main import main

TOKEN = "hf_test_READ_WRITE_token_0123456789ab"
STRENGTH = 0.8
# Files a bake must never download: pickles, Meta's original/ copy, a duplicate consolidated file, variants.
DECOYS = ("original/consolidated.00.pth", "consolidated.safetensors", "pytorch_model.bin")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubServer({TOKEN: Token("me")}) as server:
        use_endpoint(monkeypatch, server.endpoint)
        disable_xet(monkeypatch)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # for the subprocesses
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))  # for this one
        yield server


def _upload(hub: HubServer, repo_id: str, folder: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)


def _bake(tmp_path: Path, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "bake.cli.main", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture
def hub_llama(hub, tmp_path):
    """A tiny sharded llama on the Hub as ``me/tiny``, with decoys beside it; its local copy and maps."""
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="12KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2  # sharded: the out-of-core writer keeps this layout, transformers' save would not
    upload = tmp_path / "upload"
    shutil.copytree(src, upload)
    for name in DECOYS:
        (upload / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / shards[0], upload / name)
    _upload(hub, "me/tiny", upload)
    maps = tmp_path / "m.safetensors"
    make_maps(LLAMA_SITES, magnitude=0.2).save(maps)
    return src, shards, maps


def test_hub_id_bakes_out_of_core_from_the_fetched_files_only(hub, hub_llama, tmp_path):
    src, shards, maps = hub_llama
    out = tmp_path / "steered"
    proc = _bake(tmp_path, "--model", "me/tiny", "--maps", str(maps), "--strength", str(STRENGTH),
                 "--out", str(out), "--verify-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    fetched = [path for _, path, _ in hub.calls("GET", r"/me/tiny/resolve/")]
    assert any(shards[-1] in p for p in fetched)  # the weights came from the Hub...
    assert not [p for p in fetched if any(d in p for d in DECOYS)]  # ...and nothing else heavy
    # Out of core: the export keeps the source's shards (a whole-model save writes one file for this size).
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    hooked, base = hooked_and_base(src, maps, STRENGTH)
    from transformers import AutoModelForCausalLM

    baked = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    assert (hooked - base).abs().max() > 1e-3
    assert ((baked - hooked).abs().max() / hooked.abs().max()) < 1e-5
    record = json.loads((out / "lineas_provenance.json").read_text())
    assert record["base_model"]["name"] == "me/tiny"


def test_cached_hub_id_bakes_offline_without_asking_the_hub(hub, hub_llama, tmp_path):
    _, _, maps = hub_llama
    first = _bake(tmp_path, "--model", "me/tiny", "--maps", str(maps), "--out", str(tmp_path / "a"),
                  "--verify-tokens", "1", "--no-verify")
    assert first.returncode == 0, first.stderr
    asked = len(hub.requests)
    again = _bake(tmp_path, "--model", "me/tiny", "--maps", str(maps), "--out", str(tmp_path / "b"),
                  "--verify-tokens", "1", "--no-verify", offline=True)
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == asked and (tmp_path / "b" / "config.json").is_file()


def test_dry_run_of_a_hub_id_plans_from_its_config_without_fetching_the_shards(hub, hub_llama, tmp_path, capsys):
    _, _, maps = hub_llama
    assert main(["--model", "me/tiny", "--maps", str(maps), "--dry-run"]) == 0
    assert "model.layers.1.input_layernorm" in capsys.readouterr().out
    fetched = [path for _, path, _ in hub.calls("GET", r"/me/tiny/resolve/")]
    assert any("config.json" in p for p in fetched)
    assert not [p for p in fetched if p.endswith(".safetensors")]  # the index (.json) only
    assert not list(tmp_path.glob("*-steered"))


def test_unknown_hub_id_exits_2_naming_it_and_writes_nothing(hub, tmp_path, capsys):
    maps = tmp_path / "m.safetensors"
    make_maps(LLAMA_SITES).save(maps)
    out = tmp_path / "o"
    assert main(["--model", "me/absent", "--maps", str(maps), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'me/absent'" in err and "Hugging Face Hub" in err and TOKEN not in err
    assert not out.exists()


def test_out_is_checked_before_a_hub_id_is_downloaded(hub, hub_llama, tmp_path, capsys):
    _, _, maps = hub_llama
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    asked = len(hub.requests)
    assert main(["--model", "me/tiny", "--maps", str(maps), "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert len(hub.requests) == asked  # refused before any request


def test_hub_pipeline_goes_to_the_pipeline_family_without_variants(hub, tiny_pipeline_folder, tmp_path):
    pytest.importorskip("diffusers")
    from tiny_pipelines import random_maps

    from lineas.pipelines import load_pipeline

    src = tiny_pipeline_folder("sd")
    upload = tmp_path / "upload"
    shutil.copytree(src, upload)
    variant = "unet/diffusion_pytorch_model.fp16.safetensors"
    shutil.copyfile(src / "unet" / "diffusion_pytorch_model.safetensors", upload / variant)
    _upload(hub, "me/pipe", upload)
    maps = tmp_path / "m.safetensors"
    random_maps(load_pipeline(src), ["unet.conv_norm_out", "unet.down_blocks.1.resnets.1.norm2"], seed=1).save(maps)
    proc = _bake(tmp_path, "--model", "me/pipe", "--maps", str(maps), "--verify-steps", "1")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "pipe-steered"  # named after the repo, not the cache's snapshot folder
    assert (out / "model_index.json").is_file()
    assert json.loads((out / "lineas_provenance.json").read_text())["base_model"]["name"] == "me/pipe"
    fetched = [path for _, path, _ in hub.calls("GET", r"/me/pipe/resolve/")]
    assert any("unet/diffusion_pytorch_model.safetensors" in p for p in fetched)
    assert not [p for p in fetched if variant in p]
    asked = len(hub.requests)  # once cached, it bakes offline too (diffusers' download included)
    again = _bake(tmp_path, "--model", "me/pipe", "--maps", str(maps), "--verify-steps", "1", "--out",
                  str(tmp_path / "again"), "--no-verify", offline=True)
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == asked and (tmp_path / "again" / "model_index.json").is_file()
