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

    def maps_with(self, name: str, scale: float = 1.0, **meta: str) -> Path:
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
        "GGUF files are not supported as --model"),
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
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


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
    capsys.readouterr()
    rc = row.prog(argv)
    err = capsys.readouterr().err
    assert rc == row.code, err
    assert row.needle.format(tmp=tmp_path) in err
    assert "Traceback" not in err
    assert _tree(tmp_path) == before, "the failed run left files behind"
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
