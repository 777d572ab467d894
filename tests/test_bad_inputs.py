"""Bad inputs (issue 8, section 4): one row per case, each with its exit code, a message substring, and
nothing left on disk afterwards (no --out folder, no lineas_tmp_/lineas_old_ leftovers, no file at all).

Every row runs the real CLI on a tiny Llama.  Leftovers after SIGTERM/SIGKILL are tested with a real
subprocess below the table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from bake_fixtures import LLAMA_SITES, setup_model

from bake.cli.main import main as bake_main
from lineas.cli import main as train_main
from lineas.maps import SiteMap, SteeringMaps

EXIT_BAD_INPUT = 2


@dataclass
class World:
    """A tiny Llama and a maps file in ``tmp`` (the working directory), plus builders for odd inputs."""

    tmp: Path
    model: Path
    maps: Path

    def base(self, *extra: str) -> list[str]:
        return ["--model", str(self.model), "--maps", str(self.maps), "--out", str(self.tmp / "out"), *extra]

    def quantised(self, quant: dict) -> Path:
        folder = self.tmp / "quantised"
        shutil.copytree(self.model, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = quant
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    def maps_with(self, name: str, scale: float = 1.5, **meta: str) -> Path:  # 1.0: identity maps, refused first
        site = LLAMA_SITES[0]
        maps = SteeringMaps({site: SiteMap(torch.full((64,), scale), torch.zeros(64))}, {"method": "test", **meta})
        return maps.save(self.tmp / name)

    def nested_model(self) -> Path:
        folder = self.tmp / "models" / "tiny"
        shutil.copytree(self.model, folder)
        return folder

    def read_only_dir(self) -> Path:
        if os.geteuid() == 0:  # root writes through chmod; sysfs refuses even root
            return Path("/sys/lineas-bake-test-out")
        folder = self.tmp / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"

    def baked_export(self) -> Path:
        out = self.tmp / "baked"
        assert bake_main(["--model", str(self.model), "--maps", str(self.maps), "--out", str(out),
                          "--verify-tokens", "2"]) == 0
        return out

    def prompts(self) -> tuple[str, str]:
        for name, text in (("src.txt", "bad day\nawful film\n"), ("tgt.txt", "good day\ngreat film\n")):
            (self.tmp / name).write_text(text)
        return str(self.tmp / "src.txt"), str(self.tmp / "tgt.txt")


def _small_disk(monkeypatch):
    import bake.publish.outdir

    real = shutil.disk_usage
    monkeypatch.setattr(bake.publish.outdir.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))


def _disk_fills_while_writing(monkeypatch):
    """The up-front free-space check passes, then the disk fills while the export is written."""
    import errno
    import importlib

    export_module = importlib.import_module("bake.formats.export")  # the package re-exports a function of that name

    def full(folder, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(export_module, "write_verification", full)


def _push_tampered(w: World, how: str) -> Path:
    """A real export changed after the bake (push rows): weights swapped for the base's, a .env, a symlink out."""
    out = w.baked_export()
    if how == "swap":
        shutil.copyfile(w.model / "model.safetensors", out / "model.safetensors")
    elif how == "dotenv":
        (out / ".env").write_text("HF_TOKEN=hf_not_a_token\n")
    else:
        (out / "notes.safetensors").symlink_to(w.maps)
    return out


def _push_card_only(w: World) -> Path:
    (w.tmp / "card-only").mkdir()
    (w.tmp / "card-only" / "README.md").write_text("# a model\n")
    return w.tmp / "card-only"


@dataclass(frozen=True)
class Row:
    id: str
    argv: Callable[[World], list[str]]  # may create the odd input it needs
    needle: str  # formatted with tmp=<the world's folder>
    code: int = EXIT_BAD_INPUT
    prog: Callable[[list[str]], int] = bake_main
    env: dict = field(default_factory=dict)
    patch: Callable | None = None
    marks: tuple = ()


ROWS = [
    Row("device-bogus", lambda w: w.base("--device", "bogus"), "unknown --device 'bogus'"),
    Row("device-cuda-missing", lambda w: w.base("--device", "cuda"), "CUDA is not available",
        marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),)),
    Row("device-cuda-index", lambda w: w.base("--device", "cuda:64"), "--device 'cuda:64'"),
    Row("train-device-bogus", lambda w: ["--model", str(w.model), "--source", w.prompts()[0], "--target",
                                         w.prompts()[1], "--sites", LLAMA_SITES[0], "--out",
                                         str(w.tmp / "out.safetensors"), "--device", "bogus"],
        "unknown --device 'bogus'", prog=train_main),
    Row("quantised-bitsandbytes",
        lambda w: ["--model", str(w.quantised({"quant_method": "bitsandbytes", "load_in_4bit": True})),
                   "--maps", str(w.maps), "--out", str(w.tmp / "out")], "quantised (bitsandbytes"),
    Row("quantised-fp8", lambda w: ["--model", str(w.quantised({"quant_method": "fp8"})), "--maps", str(w.maps),
                                    "--out", str(w.tmp / "out")], "Bake the unquantised base model"),
    Row("out-parent-is-file", lambda w: w.base()[:4] + ["--out", str(w.maps / "sub")], "is a file"),
    Row("out-read-only", lambda w: w.base()[:4] + ["--out", str(w.read_only_dir())], "cannot write in"),
    Row("out-disk-full", lambda w: w.base(), "is free on the file system", patch=_small_disk),
    Row("out-disk-fills-while-writing", lambda w: w.base(), "No space left on device", patch=_disk_fills_while_writing),
    Row("verify-steps-for-an-llm", lambda w: w.base() + ["--verify-steps", "2"],
        "--verify-steps: diffusers-pipeline option(s)"),
    Row("out-dot", lambda w: w.base()[:4] + ["--out", "."], "is the current directory"),
    Row("out-dot-overwrite", lambda w: w.base()[:4] + ["--out", ".", "--overwrite"], "is the current directory"),
    Row("out-contains-model", lambda w: ["--model", str(w.nested_model()), "--maps", str(w.maps), "--out",
                                         str(w.tmp / "models"), "--overwrite"], "is or contains the model folder"),
    Row("out-is-model", lambda w: w.base()[:4] + ["--out", str(w.model), "--overwrite"], "is or contains the model"),
    Row("float16-overflow", lambda w: ["--model", str(w.model), "--maps", str(w.maps_with("big.safetensors", 1e5)),
                                       "--out", str(w.tmp / "out"), "--dtype", "float16", "--verify-tokens", "2"],
        f"non-finite (folded from the map(s) at site(s) {LLAMA_SITES[0]})"),
    Row("model-missing-dir", lambda w: ["--model", str(w.tmp / "no-such-model"), "--maps", str(w.maps)],
        "no such directory"),
    Row("model-gguf", lambda w: ["--model", str(w.tmp / "model.Q4.gguf"), "--maps", str(w.maps)],
        "no such GGUF file"),
    Row("model-without-config", lambda w: ["--model", str(w.tmp), "--maps", str(w.maps), "--out",
                                           str(w.tmp / "out")], "no config.json in {tmp}"),
    Row("maps-directory", lambda w: w.base()[:2] + ["--maps", str(w.model), "--out", str(w.tmp / "out")],
        "is a directory, expected a lineas-maps .safetensors file"),
    Row("maps-bad-suffix", lambda w: w.base()[:2] + ["--maps", f"{w.maps}:x", "--out", str(w.tmp / "out")],
        "bad strength suffix 'x'"),
    Row("strength-huge", lambda w: w.base("--strength", "1e9"), "--allow-large-strength"),
    Row("strength-huge-suffix", lambda w: w.base()[:2] + ["--maps", f"{w.maps}:1e9", "--out", str(w.tmp / "out")],
        "is 1e+09"),
    Row("push-offline", lambda w: ["push", str(w.model), "me/steered"], "offline mode is on (HF_HUB_OFFLINE=1)",
        env={"HF_HUB_OFFLINE": "1"}),
    Row("push-to-hub-offline", lambda w: w.base("--push-to-hub", "me/steered"), "offline mode is on (HF_HUB_OFFLINE=1)",
        env={"HF_HUB_OFFLINE": "1"}),
    Row("maps-other-model-type",
        lambda w: w.base()[:2] + ["--maps", str(w.maps_with("g.safetensors", model_type="gpt2")),
                                  "--out", str(w.tmp / "out")],
        "learned on model_type 'gpt2', but"),
    Row("maps-other-config", lambda w: w.base()[:2] + ["--maps", str(w.maps_with("c.safetensors", model_type="llama",
                                                                                 config_sha256="ab" * 32)),
                                                       "--out", str(w.tmp / "out")],
        "config_sha256 abababababababab"),
    Row("rebake-same-maps", lambda w: ["--model", str(w.baked_export()), "--maps", str(w.maps), "--out",
                                       str(w.tmp / "out")], "already baked into this model"),
    Row("push-swapped-weights", lambda w: ["push", str(_push_tampered(w, "swap")), "me/steered", "--dry-run"],
        "model.safetensors: changed after the bake"),
    Row("push-dotenv", lambda w: ["push", str(_push_tampered(w, "dotenv")), "me/steered", "--dry-run"],
        ".env: dotfile"),
    Row("push-symlink-outside", lambda w: ["push", str(_push_tampered(w, "symlink")), "me/steered", "--dry-run"],
        "notes.safetensors: symlink to {tmp}/llama.safetensors (outside the folder)"),
    Row("push-card-only", lambda w: ["push", str(_push_card_only(w)), "me/steered", "--dry-run"],
        "lineas_provenance.json: missing"),
    # checks that can fail, defensive parsing (issue 25, classes 5, 8, 10, 11)
    Row("check-strength-zero", lambda w: w.base("--strength", "0"), "λ = 0 changes nothing"),
    Row("check-maps-twice", lambda w: w.base("--maps", str(w.maps)), "given twice in one command"),
    Row("check-strength-underflows", lambda w: w.base()[:2] + ["--maps", f"{w.maps}:1e-45", "--out",
                                                               str(w.tmp / "out")], "are the identity at every site"),
    Row("check-maps-overflow-is-non-finite", lambda w: ["--model", str(w.model), "--maps",
                                                        str(w.maps_with("inf.safetensors", 1e30)), "--out",
                                                        str(w.tmp / "out"), "--verify-tokens", "2"],
        "is itself not finite on probe"),
    Row("parse-maps-fifo", lambda w: w.base()[:2] + ["--maps", str(_fifo(w.tmp / "maps.fifo")), "--out",
                                                     str(w.tmp / "out")], "is a FIFO (named pipe), not a regular file"),
    Row("parse-maps-overlapping-ranges", lambda w: w.base()[:2] + ["--maps", str(_overlapping(w.maps, w.tmp / "o.st")),
                                                                   "--out", str(w.tmp / "out")], "overlaps"),
    Row("parse-maps-sites-not-strings", lambda w: w.base()[:2] + ["--maps", str(w.maps_with("s.st", sites="[1, 2]")),
                                                                  "--out", str(w.tmp / "out")],
        "metadata 'sites' must be a JSON list of strings"),
    Row("parse-maps-huge-unknown-site", lambda w: w.base()[:2] + ["--maps", str(_huge_maps(w.tmp.parent / (
        w.tmp.name + "-huge.st"))), "--out", str(w.tmp / "out")],  # beside tmp: the table hashes what is in it
        "no model has a site that wide"),
    Row("parse-shard-overlapping-ranges", lambda w: ["--model", str(_model_with(w, shard_overlap=True)), "--maps",
                                                     str(w.maps), "--out", str(w.tmp / "out")], "overlaps"),
    Row("parse-config-million-layers", lambda w: ["--model", str(_model_with(w, num_hidden_layers=10 ** 6)), "--maps",
                                                  str(w.maps), "--dry-run"], "num_hidden_layers=1000000"),
    Row("parse-config-hidden-size", lambda w: ["--model", str(_model_with(w, hidden_size=128)), "--maps",
                                               str(w.maps), "--out", str(w.tmp / "out")], "hidden_size=128"),
    Row("train-out-exists", lambda w: _train_argv(w, out=_existing(w.tmp / "old.safetensors")),
        "already exists; pass --overwrite", prog=train_main),
    Row("train-out-is-model-file", lambda w: _train_argv(w, "--overwrite", out=w.model / "model.safetensors"),
        "is an input of this run", prog=train_main),
    Row("train-out-links-to-model-file", lambda w: _train_argv(w, "--overwrite", out=_link(
        w.tmp / "link.safetensors", w.model / "model.safetensors")), "through a symlink", prog=train_main),
    Row("train-out-is-source", lambda w: _train_argv(w, "--overwrite", out=w.tmp / "src.txt"),
        "is an input of this run", prog=train_main),
    Row("train-report-json-is-out", lambda w: _train_argv(w, "--report-json", str(w.tmp / "o.safetensors"),
                                                          out=w.tmp / "o.safetensors"),
        "are the same file", prog=train_main),
    Row("train-source-fifo", lambda w: _train_argv(w, source=_fifo(w.tmp / "src.fifo")),
        "is not a regular file", prog=train_main),
    Row("train-indistinguishable-sets", lambda w: _train_argv(w, texts=("zzz qqq\nwww\n", "yyy vvv\nuuu\n")),
        "tokenise to the same token ids", prog=train_main),
    Row("train-sites-regex-backtracks", lambda w: _train_argv(w, sites=r"(?:[\w.]|[\w.][\w.])+!?\d{5}"),
        "s to match the module names (catastrophic backtracking", prog=train_main),
    # paths and the output folder (issue 25, classes 1-3): nothing outside the temporary folder is written
    Row("paths-index-parent-shard", lambda w: ["--model", str(_sharded(w, "parent")), "--maps", str(w.maps), "--out",
                                               str(w.tmp / "out")], "'../x.safetensors' is not a plain file name"),
    Row("paths-index-absolute-shard", lambda w: ["--model", str(_sharded(w, "absolute")), "--maps", str(w.maps),
                                                 "--out", str(w.tmp / "out")],
        "'{tmp}/elsewhere/model.safetensors' is not a plain file name"),
    Row("out-hf-cache-blobs-overwrite", lambda w: ["--model", str(_hf_cache(w)[0]), "--maps", str(w.maps), "--out",
                                                   str(_hf_cache(w)[1]), "--overwrite"], "which the model reads"),
    Row("out-hf-cache-entry-overwrite", lambda w: ["--model", str(_hf_cache(w)[0]), "--maps", str(w.maps), "--out",
                                                   str(_hf_cache(w)[1].parent), "--overwrite"],
        "which the model reads"),
    Row("out-dangling-symlink", lambda w: w.base()[:4] + ["--out", str(_link(w.tmp / "gone", w.tmp / "nowhere"))],
        "is a symlink to"),
    # no tracebacks, ever (issue 25, class 9): each a message naming the value, exit 2 (1 for a bug, 130 for Ctrl-C)
    Row("tb-unknown-model-type", lambda w: _tb_run(w, _tb_config(model_type="nosuchtype")), "model_type 'nosuchtype'"),
    Row("tb-config-json-array", lambda w: _tb_run(w, _tb_write("config.json", "[1, 2]")), "config.json is an array"),
    Row("tb-shard-missing", lambda w: _tb_run(w, _tb_index_naming("model-00002-of-00002.safetensors")),
        "model-00002-of-00002.safetensors"),
    Row("tb-shard-truncated", lambda w: _tb_run(w, _tb_truncate), "(truncated"),
    Row("tb-dtype-fp8", lambda w: _tb_run(w, _tb_fp8), "F8_E4M3"),
    Row("tb-lineas-baked-not-a-list", lambda w: _tb_run(w, _tb_config(lineas_baked="junk")),
        "lineas_baked is a string ('junk')"),
    Row("tb-lineas-baked-entry-not-an-object", lambda w: _tb_run(w, _tb_config(lineas_baked=[1])),
        "lineas_baked[0] is a number"),
    Row("tb-lineas-baked-maps-not-a-list", lambda w: _tb_run(w, _tb_config(lineas_baked=[{"maps": "x"}])),
        "maps is a string ('x')"),
    Row("tb-provenance-not-json", lambda w: _tb_run(w, _tb_write("lineas_provenance.json", "{not json")),
        "lineas_provenance.json cannot be read"),
    Row("tb-provenance-array", lambda w: _tb_run(w, _tb_write("lineas_provenance.json", "[1]")),
        "lineas_provenance.json is an array"),
    Row("tb-provenance-bakes-entry", lambda w: _tb_run(w, _tb_write("lineas_provenance.json", '{"bakes": [1]}')),
        "bakes[0] is a number"),
    Row("tb-out-name-too-long", lambda w: w.base()[:4] + ["--out", str(w.tmp / ("a" * 300))], "300 bytes"),
    Row("tb-out-path-too-long", lambda w: w.base()[:4] + ["--out", str(w.tmp / "/".join(["b" * 200] * 25))],
        "(PATH_MAX)"),
    Row("tb-disk-fills-at-temp-folder", lambda w: w.base("--verify-tokens", "2"), "No space left on device",
        patch=lambda mp: _tb_disk_fills_at_temp_folder(mp)),
    Row("tb-internal-error", lambda w: w.base("--verify-tokens", "2"), "ZeroDivisionError: boom -- please report this",
        code=1, patch=lambda mp: _tb_raise_in_export(ZeroDivisionError("boom"))(mp)),
    Row("tb-ctrl-c-during-export", lambda w: w.base("--verify-tokens", "2"), "interrupted (Ctrl-C): the export was "
        "not written", code=130, patch=lambda mp: _tb_raise_in_export(KeyboardInterrupt())(mp)),
    Row("tb-train-internal-error", lambda w: _train_argv(w), "ZeroDivisionError: boom -- please report this", code=1,
        prog=train_main, patch=lambda mp: _tb_raise_in_training(ZeroDivisionError("boom"))(mp)),
    Row("tb-train-ctrl-c", lambda w: _train_argv(w), "interrupted (Ctrl-C): the maps file was not written", code=130,
        prog=train_main, patch=lambda mp: _tb_raise_in_training(KeyboardInterrupt())(mp)),
]


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root``, with the sha256 of each regular file: a row must leave no file behind and
    change none of its inputs (the model's files, the maps, a file beside --out), byte for byte."""
    return {str(p.relative_to(root)): _digest(p) for p in root.rglob("*")}


def _digest(p: Path) -> str:
    import hashlib
    import stat

    st = p.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"-> {os.readlink(p)}"
    if not stat.S_ISREG(st.st_mode):  # a folder, a FIFO (never opened: it would block)
        return stat.filemode(st.st_mode)
    if st.st_size > HASH_LIMIT:  # a row's sparse 4 GiB maps file: not read whole into memory
        return f"{st.st_size} bytes, mtime {st.st_mtime_ns}"
    try:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    except PermissionError:
        return "unreadable"


HASH_LIMIT = 64 << 20


def _sharded(w: World, where: str) -> Path:
    """A copy of the model whose index names its one shard by a path outside the folder (paths rows): ``parent``
    ``../x.safetensors`` (the shard beside --out), ``absolute`` (the shard elsewhere, by absolute path)."""
    folder = w.tmp / "sharded"
    shutil.copytree(w.model, folder)
    shard = w.tmp / "x.safetensors" if where == "parent" else w.tmp / "elsewhere" / "model.safetensors"
    shard.parent.mkdir(exist_ok=True)
    (folder / "model.safetensors").rename(shard)
    from safetensors import safe_open

    with safe_open(shard, "pt") as f:
        keys = list(f.keys())
    name = "../x.safetensors" if where == "parent" else str(shard)
    index = {"metadata": {}, "weight_map": {k: name for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _hf_cache(w: World) -> tuple[Path, Path]:
    """The model as a Hugging Face cache entry: snapshots/<rev>/<file> symlinked to ../../blobs/<sha256>."""
    import hashlib

    repo = w.tmp / "hub" / "models--me--tiny"
    snap, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    if snap.is_dir():
        return snap, blobs
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in w.model.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap, blobs


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_bad_input(row: Row, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model_dir, maps_path = setup_model(tmp_path)
    world = World(tmp_path, model_dir, maps_path)
    argv = row.argv(world)
    for k, v in row.env.items():
        monkeypatch.setenv(k, v)
    if row.patch is not None:
        row.patch(monkeypatch)
    before = _tree(tmp_path)
    # the inputs hashed: the model's files and the maps file at least (and every odd input the row built)
    assert len(before[str(model_dir.relative_to(tmp_path) / "model.safetensors")]) == 64
    assert len(before[maps_path.name]) == 64
    capsys.readouterr()
    rc = row.prog(argv)
    err = capsys.readouterr().err
    assert rc == row.code, err
    assert row.needle.format(tmp=tmp_path) in err
    assert "Traceback" not in err
    after = _tree(tmp_path)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not changed, f"the failed run changed its inputs: {changed}"
    assert after == before, "the failed run left files behind (or removed some)"
    assert not (tmp_path / "out").exists()


def test_every_row_is_distinct():
    assert len({r.id for r in ROWS}) == len(ROWS)


# ----------------------------------------------------------------------------- signals during the export
CHILD = """
import sys, time
from pathlib import Path
from bake.formats.export import ExportResult, register_exporter

def slow(baked, folder, opts):  # a registered export format that blocks once its folder holds the weights
    (Path(folder) / "slow-started").write_text("x")
    time.sleep(120)
    return ExportResult("slow")

register_exporter("slow", slow)
from bake.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _start_export(tmp_path: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    model_dir, maps_path = setup_model(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "--model", str(model_dir), "--maps", str(maps_path),
                             "--out", str(out), "--format", "hf,slow", "--verify-tokens", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        started = list(tmp_path.glob("lineas_tmp_*/slow-started"))
        if started:
            tmp = started[0].parent
            assert (tmp / "model.safetensors").is_file()  # the weights were written: a real partial export
            return proc, tmp
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"export never reached the slow format: {proc.communicate()[1][-2000:]}")


def test_sigterm_during_export_removes_the_temp_folder(tmp_path):
    out = tmp_path / "out"
    proc, tmp = _start_export(tmp_path, out)
    assert tmp.name.startswith(f"lineas_tmp_{proc.pid}_")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    assert not tmp.exists() and not out.exists()
    assert not list(tmp_path.glob("lineas_*"))


def test_sigkill_leftover_is_removed_by_the_next_run(tmp_path, caplog):
    out = tmp_path / "out"
    proc, tmp = _start_export(tmp_path, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert tmp.is_dir(), "SIGKILL cannot be caught: the temp folder stays until the next run"
    assert json.loads((tmp / ".lineas_owner.json").read_text())["pid"] == proc.pid
    model_dir, maps_path = tmp_path / "tiny-llama", tmp_path / "llama.safetensors"
    with caplog.at_level("WARNING"):
        rc = bake_main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out),
                        "--verify-tokens", "2"])
    assert rc == 0
    assert not tmp.exists(), "the next export into the same folder removes the dead run's temp folder"
    assert f"process {proc.pid}, which is no longer running" in caplog.text
    assert out.is_dir() and not list(tmp_path.glob("lineas_*"))


def test_live_runs_temp_folder_is_kept(tmp_path):
    """A temp folder whose owner is alive (another export in progress) is not touched."""
    from bake.publish.outdir import remove_stale

    live = tmp_path / f"lineas_tmp_{os.getppid()}_abc"
    live.mkdir()
    dead = tmp_path / "lineas_old_999999999_xyz"
    dead.mkdir()
    assert remove_stale(tmp_path) == [dead]
    assert live.is_dir() and not dead.exists()


def test_previous_output_moved_aside_by_a_killed_run_is_restored(tmp_path):
    """Killed between the two renames of an --overwrite: the old export sits in lineas_old_*/old, none in place."""
    from bake.publish.outdir import OWNER_FILE, remove_stale

    out = tmp_path / "export"
    aside = tmp_path / "lineas_old_999999999_abc"
    (aside / "old").mkdir(parents=True)
    (aside / "old" / "config.json").write_text("{}")
    (aside / OWNER_FILE).write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(), "out": str(out)}))
    remove_stale(tmp_path)
    assert (out / "config.json").read_text() == "{}" and not aside.exists()


# ----------------------------------------------------------------------------- inputs of the check-/parse-/train- rows
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _existing(path: Path) -> Path:
    path.write_bytes(b"an earlier file")
    return path


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _rewrite_header(src: Path, dst: Path, edit) -> Path:
    """``src`` (a safetensors file) with its JSON header edited by ``edit(header)``, the data unchanged."""
    import struct

    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])
    return dst


def _overlapping(src: Path, dst: Path) -> Path:
    """Two tensors of one size given the same byte range (the other range is left unused)."""
    def edit(h):
        a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return _rewrite_header(src, dst, edit)


def _huge_maps(path: Path) -> Path:
    """A maps file whose header claims two 1 GiB tensors at a site no model has (a sparse file: no disk used)."""
    import struct

    n = (1 << 30) // 4
    header = {"__metadata__": {"format": "lineas-maps", "format_version": "1"},
              "no.such.site.scale": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
              "no.such.site.shift": {"dtype": "F32", "shape": [n], "data_offsets": [4 * n, 8 * n]}}
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + 8 * n)
    return path


def _model_with(w: World, shard_overlap: bool = False, **config) -> Path:
    """A copy of the tiny model with ``config`` entries changed, or a shard whose tensor ranges overlap."""
    folder = w.tmp / "odd-model"
    shutil.copytree(w.model, folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    if shard_overlap:
        shard = folder / "model.safetensors"
        _overlapping(shard, folder / "tmp.safetensors").replace(shard)
    return folder


def _train_argv(w: World, *extra: str, out: Path | None = None, source: Path | None = None,
                texts: tuple[str, str] | None = None, sites: str = LLAMA_SITES[0]) -> list[str]:
    """lineas-train on the tiny model (given a tokenizer) with prompt files in the world's folder."""
    from bake_fixtures import save_tokenizer

    if not (w.model / "tokenizer.json").is_file():
        save_tokenizer(w.model)
    src, tgt = w.prompts()
    texts = texts or ("The capital of France is\nOnce upon a time\n", "in a small village by the sea\n")
    Path(src).write_text(texts[0])  # words the tiny tokenizer knows: the sets differ in token ids
    Path(tgt).write_text(texts[1])
    return ["--model", str(w.model), "--source", str(source or src), "--target", tgt, "--sites", sites,
            "--out", str(out or w.tmp / "out.safetensors"), "--steps", "1", "--quiet", *extra]


# ----------------------------------------------------------------------------- inputs of the tb- rows (issue 25)
def _tb_model(w: World, edit: Callable[[Path], None]) -> Path:
    """A copy of the tiny model changed by ``edit(folder)``."""
    folder = w.tmp / "tb-model"
    shutil.copytree(w.model, folder)
    edit(folder)
    return folder


def _tb_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _tb_write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _tb_index_naming(missing: str) -> Callable[[Path], None]:
    """An index that spreads the tensors over ``model.safetensors`` and ``missing``, a shard that is not there."""
    def edit(folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        weight_map = {k: ("model.safetensors", missing)[i % 2] for i, k in enumerate(keys)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return edit


def _tb_truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _tb_fp8(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _tb_run(w: World, edit: Callable[[Path], None]) -> list[str]:
    return ["--model", str(_tb_model(w, edit)), "--maps", str(w.maps), "--out", str(w.tmp / "out"),
            "--verify-tokens", "2"]


def _tb_disk_fills_at_temp_folder(monkeypatch):
    """The temporary folder is created, then the disk fills before its owner marker is written."""
    import errno

    from bake.publish.outdir import OWNER_FILE

    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == OWNER_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)


def _tb_raise_in_export(exc: BaseException):
    """The export's verification report raises ``exc`` (a bug, or Ctrl-C) once the weights are written."""
    def patch(monkeypatch):
        import importlib

        def boom(*a, **k):
            raise exc

        monkeypatch.setattr(importlib.import_module("bake.formats.export"), "write_verification", boom)
    return patch


def _tb_raise_in_training(exc: BaseException):
    def patch(monkeypatch):
        import lineas.learn.train

        def boom(*a, **k):
            raise exc

        monkeypatch.setattr(lineas.learn.train, "learn_maps", boom)
    return patch
