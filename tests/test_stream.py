"""The out-of-core engine: a sharded checkpoint folded shard by shard and verified with bounded memory.

The tiny checkpoints are saved with a small ``max_shard_size`` so that a module's weight and
its bias land in different shards, and the verification budget is set so small that layers
are read from disk as they run.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bake_fixtures import assert_close_rel, hooked_and_base, load, logits, make_maps
from onnx_extra import require_onnx_extra
from tiny import ARCHS, tiny_model

from bake.api import bake, bake_folder
from bake.cli.main import main
from bake.errors import BakeError, NonFiniteCastError
from bake.store.checkpoint import largest_block_bytes, load_bounded, load_skeleton
from bake.store.shards import INDEX_FILE, ShardFolder, raw_blocks, read_as

# Qwen2 has q/k/v biases of its own: every one of these folds into standard weights.
QWEN2_SITES = ("model.layers.0.input_layernorm", "model.layers.1.input_layernorm",
               "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
GEMMA2_SITES = ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                "model.layers.1.pre_feedforward_layernorm", "model.norm")


def sharded_checkpoint(tmp_path: Path, arch: str, sites, *, dtype=torch.float32, shard: str = "12KB"):
    model = tiny_model(arch).to(dtype)
    src = tmp_path / f"src-{arch}"
    model.save_pretrained(src, max_shard_size=shard)
    maps_path = tmp_path / f"{arch}.maps.safetensors"
    make_maps(sites, magnitude=0.2).save(maps_path)
    return model, src, maps_path


def tight_budget(folder: Path) -> int:
    """A --max-memory that holds the largest block and one or two more: the rest runs from disk."""
    return int(largest_block_bytes(load_skeleton(folder)) * 1.8)


def tensor_sha(folder: ShardFolder, key: str) -> str:
    h = hashlib.sha256()
    for block in raw_blocks(folder.info(key)):
        h.update(block)
    return h.hexdigest()


def written_tensors(folder: Path) -> dict[str, torch.Tensor]:
    sf = ShardFolder(folder)
    return {k: sf.get(k) for k in sf.keys()}


def test_sharded_bake_matches_hooks_keeps_bytes_and_writes_a_true_index(tmp_path):
    model, src, maps_path = sharded_checkpoint(tmp_path, "qwen2", QWEN2_SITES)
    source = ShardFolder(src)
    split = [m for m in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")
             if source.file_of(f"{m}.weight") != source.file_of(f"{m}.bias")]
    assert split, "test setup: no module has its weight and bias in different shards"
    assert len(source.files) > 3

    baked = bake_folder(src, maps_path, max_memory=tight_budget(src))
    assert not baked.plan.affine_sites
    out = baked.save_pretrained(tmp_path / "out")
    assert baked.export_report.passed and baked.export_report.sites

    hooked, base = hooked_and_base(src, maps_path, 1.0)
    assert (hooked - base).abs().max() > 1e-2  # the maps steer: the comparison below can fail
    assert_close_rel(logits(load(out)), hooked)  # plain transformers, no remote code

    result = ShardFolder(out)
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(result.keys())
    assert all(result.file_of(k) == f for k, f in index["weight_map"].items())
    assert index["metadata"]["total_size"] == result.total_bytes()
    assert result.files == source.files  # every shard keeps its name

    touched = {t for p in baked.plan.sites for s in p.steps for t in s.tensors}
    untouched = [k for k in source.keys() if k not in touched]
    assert untouched and all(tensor_sha(result, k) == tensor_sha(source, k) for k in untouched)
    assert any(tensor_sha(result, k) != tensor_sha(source, k) for k in touched if k in source)


@pytest.mark.parametrize("arch,sites", [("qwen2", QWEN2_SITES), ("gemma2", GEMMA2_SITES)])
def test_folder_and_in_memory_bakes_write_identical_tensors(tmp_path, arch, sites):
    model, src, maps_path = sharded_checkpoint(tmp_path, arch, sites)
    folder_out = bake_folder(src, maps_path).save_pretrained(tmp_path / "folder")
    memory_out = bake(model, maps_path).save_pretrained(tmp_path / "memory")
    a, b = written_tensors(folder_out), written_tensors(memory_out)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different
    cfg_a = json.loads((folder_out / "config.json").read_text())
    cfg_b = json.loads((memory_out / "config.json").read_text())
    for key in ("attention_bias", "lineas_affine_sites", "auto_map", "tie_word_embeddings"):
        assert cfg_a.get(key) == cfg_b.get(key), key
    assert [b["effective_digest"] for b in cfg_a["lineas_baked"]] == [b["effective_digest"]
                                                                     for b in cfg_b["lineas_baked"]]


def test_gemma2_affine_modules_stream_and_reload_with_remote_code(tmp_path):
    _, src, maps_path = sharded_checkpoint(tmp_path, "gemma2", GEMMA2_SITES)
    baked = bake_folder(src, maps_path, max_memory=tight_budget(src))
    assert baked.plan.affine_sites
    out = baked.save_pretrained(tmp_path / "out")
    hooked, base = hooked_and_base(src, maps_path, 1.0)
    assert (hooked - base).abs().max() > 1e-2
    assert_close_rel(logits(load(out, trust_remote_code=True)), hooked)
    assert "model.embed_tokens.weight" in ShardFolder(out) and "lm_head.weight" not in ShardFolder(out)


def test_bounded_load_offloads_layers_and_hooks_still_fire(tmp_path):
    model, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",))
    seen = []
    with load_bounded(src, max_memory=tight_budget(src)) as m:
        assert "disk" in set(m.hf_device_map.values())
        handle = m.model.layers[1].mlp.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        got = logits(m)
        handle.remove()
    assert seen
    assert_close_rel(got, logits(load(src)), rel=1e-6)


def test_bounded_load_of_a_bfloat16_checkpoint_reads_blocks_into_float32(tmp_path):
    """Resident tensors are read block by block into the run dtype (no whole bf16 copy beside the fp32
    one); what runs is the checkpoint's values exactly, resident or offloaded."""
    model, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",), dtype=torch.bfloat16)
    shards = ShardFolder(src)
    emb = shards.info("model.embed_tokens.weight")
    small = read_as(emb, torch.float32, block=64)  # many blocks, one of them partial
    assert emb.nbytes > 64 * 4 and small.dtype == torch.float32
    assert torch.equal(small, shards.get("model.embed_tokens.weight").float())
    with load_bounded(src, max_memory=tight_budget(src)) as m:
        assert "disk" in set(m.hf_device_map.values())
        assert m.model.embed_tokens.weight.dtype == torch.float32
        assert torch.equal(m.model.embed_tokens.weight, small)
        got = logits(m)
    assert_close_rel(got, logits(load(src)), rel=1e-6)


def test_offloaded_weights_are_read_once_per_run(tmp_path, monkeypatch):
    """accelerate asks ``name in state_dict`` before ``state_dict[name]``: answering must not read."""
    import bake.store.checkpoint as ck

    _, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",))
    with load_bounded(src, max_memory=tight_budget(src)) as m:
        offloaded = [n for n, p in m.named_parameters() if p.device.type == "meta"]
        assert offloaded
        reads = []
        real = ck.read_as
        monkeypatch.setattr(ck, "read_as", lambda info, dtype, **kw: reads.append(info.key) or real(info, dtype, **kw))
        logits(m)
    assert sorted(reads) == sorted(offloaded)


def test_bounded_load_names_a_parameter_the_checkpoint_lacks(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    weights = load_file(src / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BakeError, match="model.norm.weight"):
        with load_bounded(src):
            pass


def test_bfloat16_checkpoint_exports_in_float32_and_in_bfloat16(tmp_path):
    _, src, maps_path = sharded_checkpoint(tmp_path, "qwen2", QWEN2_SITES, dtype=torch.bfloat16)
    baked = bake_folder(src, maps_path)
    source = ShardFolder(src)
    touched = {t for p in baked.plan.sites for s in p.steps for t in s.tensors}

    up = baked.save_pretrained(tmp_path / "f32", dtype="float32")
    converted = ShardFolder(up)
    for k in source.keys():
        assert converted.info(k).dtype == torch.float32
        if k not in touched:
            assert torch.equal(converted.get(k), source.get(k).float())

    same = baked.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    kept = ShardFolder(same)
    assert all(tensor_sha(kept, k) == tensor_sha(source, k) for k in source.keys() if k not in touched)
    labels = [c.label for c in baked.export_report.checks]
    assert any("float32" in x and c.gating for x, c in zip(labels, baked.export_report.checks))
    assert any("bfloat16" in x for x in labels)
    assert not any(p.name.startswith(".lineas") for p in same.iterdir())


def test_dry_run_reads_no_weight(tmp_path, capsys, monkeypatch):
    _, src, maps_path = sharded_checkpoint(tmp_path, "llama", ("model.layers.0.input_layernorm",
                                                               "model.layers.1.mlp.down_proj"))
    import safetensors
    import transformers.modeling_utils as mu

    def refuse(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(mu, "safe_open", refuse)
    rc = main(["--model", str(src), "--maps", str(maps_path), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "model.layers.0.input_layernorm" in out


@pytest.mark.parametrize("text,says", [("lots", "lots"), ("-1GB", "-1GB"), ("2XB", "2XB"),
                                       ("10KB", "too small for this model")])
def test_bad_max_memory_exits_2_naming_it(tmp_path, capsys, text, says):
    _, src, maps_path = sharded_checkpoint(tmp_path, "llama", ("model.layers.0.input_layernorm",))
    rc = main(["--model", str(src), "--maps", str(maps_path), "--out", str(tmp_path / "o"), f"--max-memory={text}"])
    err = capsys.readouterr().err
    assert rc == 2 and says in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("lineas_*"))


def test_onnx_refused_up_front_when_the_model_cannot_fit(tmp_path, capsys, monkeypatch):
    require_onnx_extra()
    _, src, maps_path = sharded_checkpoint(tmp_path, "llama", ("model.layers.0.input_layernorm",))
    import bake.store.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    rc = main(["--model", str(src), "--maps", str(maps_path), "--out", str(tmp_path / "o"), "--format", "hf,onnx"])
    err = capsys.readouterr().err
    assert rc == 2 and "the ONNX export needs the whole model in memory" in err
    assert not (tmp_path / "o").exists()


CHILD = """
import sys, time
from pathlib import Path
import bake.formats.shard_writer as stream

real = stream.write_layout

def slow(layout, src, dst, final, maps, **kw):  # the shards are written; the reference thread may still run
    real(layout, src, dst, final, maps, **kw)
    (Path(dst) / "written").write_text("x")
    time.sleep(120)

stream.write_layout = slow
from bake.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_streaming_removes_everything_at_once(tmp_path):
    _, src, maps_path = sharded_checkpoint(tmp_path, "qwen2", QWEN2_SITES)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "--model", str(src), "--maps", str(maps_path),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob("lineas_tmp_*/written")):
        time.sleep(0.05)
    written = list(tmp_path.glob("lineas_tmp_*/written"))
    assert written, proc.communicate()[1][-2000:]
    assert list(written[0].parent.glob("*.safetensors"))  # a real partial export
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("lineas_*"))


def test_base_weight_overflowing_float16_fails_naming_it_and_writes_nothing(tmp_path, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6  # not a site: the base itself overflows float16
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="12KB")
    maps_path = make_maps(("model.layers.0.input_layernorm",), magnitude=0.2).save(tmp_path / "m.safetensors")
    rc = main(["--model", str(src), "--maps", str(maps_path), "--out", str(tmp_path / "o"), "--dtype", "float16"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "model.layers.1.mlp.up_proj.weight" in err and "the base model itself does not fit" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("lineas_*"))


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "in-memory"])
def test_a_folded_norm_whose_base_value_overflows_float16_blames_the_base_not_the_maps(tmp_path, capsys, streamed):
    """The site's own weight is written by the fold, but it is out of float16's range before any steering."""
    from bake import bake

    site = "model.layers.0.input_layernorm"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = 1e6
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="12KB")
    maps_path = make_maps((site,), magnitude=0.2).save(tmp_path / "m.safetensors")
    if streamed:
        rc = main(["--model", str(src), "--maps", str(maps_path), "--out", str(tmp_path / "o"), "--dtype", "float16",
                   "--verify-tokens", "2"])
        err = capsys.readouterr().err
        assert rc == 2, err
    else:
        baked = bake(model, str(maps_path), verify_tokens=2)
        with pytest.raises(NonFiniteCastError) as e:
            baked.save_pretrained(tmp_path / "o", dtype="float16")
        err = str(e.value)
    assert f"{site}.weight" in err and "the base model itself does not fit" in err
    assert "folded from the map(s)" not in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("lineas_*"))


def test_in_memory_bake_of_a_folder_too_big_for_ram_is_refused_before_loading(tmp_path, monkeypatch):
    _, src, maps_path = sharded_checkpoint(tmp_path, "llama", ("model.layers.0.input_layernorm",))
    import bake.store.checkpoint as checkpoint
    from bake.store.checkpoint import MemoryBudgetError

    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    with pytest.raises(MemoryBudgetError, match="bake_folder"):
        bake(str(src), maps_path)
    assert bake_folder(src, maps_path).save_pretrained(tmp_path / "out").is_dir()  # out of core it bakes


def test_device_map_keeps_tied_embeddings_and_what_fits_on_the_device(tmp_path):
    """The bounded map, computed on the meta skeleton (no GPU needed to plan one for CUDA)."""
    from bake.store.checkpoint import device_map_for

    gemma = tmp_path / "g"
    tiny_model("gemma2").save_pretrained(gemma)  # tied embeddings
    skeleton = load_skeleton(gemma)
    largest = largest_block_bytes(skeleton)
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(skeleton)
    budget = int(largest * 1.8)
    for device, where in ((torch.device("cpu"), "cpu"), (torch.device("cuda"), 0), (torch.device("cuda:1"), 1)):
        dmap = device_map_for(skeleton, device, budget)
        assert dmap["model.embed_tokens"] == where and dmap["lm_head"] == where
        assert set(dmap.values()) == {where, "disk"}
        resident = sum(sizes[k] for k, v in dmap.items() if v == where)
        biggest_read = max(sizes[k] for k, v in dmap.items() if v == "disk")
        assert resident + biggest_read <= budget
    assert device_map_for(skeleton, torch.device("cpu"), 1 << 40) == "cpu"  # fits: loaded whole, no hooks
    # Blocks read as mapped pages: only the tied ones stay (and modules holding buffers only).
    kept = device_map_for(skeleton, torch.device("cpu"), budget, keep_resident=False)
    resident = {k for k, v in kept.items() if v == "cpu"}
    assert {"model.embed_tokens", "lm_head"} <= resident and not any(".layers." in k for k in resident)
    roomy = sizes[""] - 1  # all but one block would fit
    assert any(".layers." in k for k, v in device_map_for(skeleton, torch.device("cpu"), roomy).items() if v == "cpu")
    kept = device_map_for(skeleton, torch.device("cpu"), roomy, keep_resident=False)
    assert not any(".layers." in k for k, v in kept.items() if v == "cpu")
    assert device_map_for(skeleton, torch.device("cpu"), 1 << 40, keep_resident=False) == "cpu"


@pytest.mark.parametrize("dtype,kept", [(torch.float32, False), (torch.bfloat16, True)])
def test_bounded_load_keeps_blocks_resident_only_when_reading_them_converts(tmp_path, dtype, kept):
    """A float32 folder run in float32 is read as mapped pages (resident blocks would only add memory);
    a bfloat16 one is converted on every read, so what fits the budget stays."""
    from accelerate.utils import compute_module_sizes

    _, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",), dtype=dtype)
    roomy = compute_module_sizes(load_skeleton(src))[""] - 1  # all but one block would fit
    with load_bounded(src, max_memory=roomy) as m:
        where = m.hf_device_map
        layers = [v for k, v in where.items() if ".layers." in k]
        assert "disk" in layers and ("cpu" in layers) == kept
        got = logits(m)
        del m
    assert_close_rel(got, logits(load(src)), rel=1e-6)


def test_untied_embeddings_stream_like_in_memory(tmp_path):
    """--untie-embeddings: the folded embedding gets its own tensor; lm_head keeps the original values
    under a new key (the checkpoint stored the tied weight once)."""
    model = tiny_model("llama_tied")
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="12KB")
    assert "lm_head.weight" not in ShardFolder(src)
    maps_path = make_maps(("model.embed_tokens", "model.layers.0.input_layernorm"), magnitude=0.2).save(
        tmp_path / "m.safetensors")
    baked = bake_folder(src, maps_path, untie=True)
    assert baked.plan.untied
    out = baked.save_pretrained(tmp_path / "out")
    hooked, base = hooked_and_base(src, maps_path, 1.0)
    assert (hooked - base).abs().max() > 1e-2
    assert_close_rel(logits(load(out)), hooked)
    a, b = written_tensors(out), written_tensors(bake(model, maps_path, untie=True).save_pretrained(tmp_path / "m"))
    assert sorted(a) == sorted(b) and "lm_head.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["lm_head.weight"], ShardFolder(src).get("model.embed_tokens.weight"))


@pytest.mark.parametrize("arch", ARCHS + ["llama_tied"])
def test_every_registry_architecture_streams_the_same_tensors_as_in_memory(arch, tmp_path):
    from test_bake_archs import _norm_and_producer_sites, _random_maps

    model = tiny_model(arch)
    maps_path = _random_maps(model, _norm_and_producer_sites(model)).save(tmp_path / "m.safetensors")
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="12KB")
    streamed = bake_folder(src, maps_path).save_pretrained(tmp_path / "folder")
    a, b = written_tensors(streamed), written_tensors(bake(model, maps_path).save_pretrained(tmp_path / "memory"))
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []


def test_onnx_only_export_of_a_streamed_bake_is_checked_against_a_recorded_reference(tmp_path):
    require_onnx_extra()
    _, src, maps_path = sharded_checkpoint(tmp_path, "llama", ("model.layers.0.input_layernorm",
                                                               "model.layers.1.post_attention_layernorm"))
    baked = bake_folder(src, maps_path)
    out = baked.save_pretrained(tmp_path / "out", formats="onnx")
    assert baked.reference is not None and (out / "onnx" / "model.onnx").is_file()
    onnx_checks = [c for c in baked.export_report.checks if c.tolerance.name.startswith("onnx")]
    assert onnx_checks and all(c.passed and c.gating for c in onnx_checks)


def test_reference_offloaded_benchmark_runs_and_prints_its_fields(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from bake_fixtures import LLAMA_SITES

    _, src, maps_path = sharded_checkpoint(tmp_path, "llama", LLAMA_SITES)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "reference_offloaded.py"), "--model", str(src),
                          "--maps", str(maps_path), "--n-tokens", "3"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(out) == {"load_s", "reference_s", "passes", "reads_s", "peak_rss_gib"}
    assert out["passes"] == 3 and out["reference_s"] > 0


def test_maps_naming_a_module_the_folder_lacks_are_refused_before_their_tensors_are_read(tmp_path, monkeypatch):
    """A local folder's skeleton costs nothing: the maps' sites are checked against it from the header."""
    import lineas.maps

    _, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.layers.0.input_layernorm",))
    maps_path = make_maps(("model.layers.0.input_layernorm", "model.nope")).save(tmp_path / "m.safetensors")
    monkeypatch.setattr(lineas.maps, "safe_open", lambda *a, **k: pytest.fail("the tensors were read"))
    with pytest.raises(lineas.maps.MapsFormatError, match=r"unknown site\(s\) 'model.nope' \(not modules"):
        bake_folder(str(src), str(maps_path), plan_only=True)
