"""The output folder (issue 25, classes 2, 3 and 12b): a lock claims --out, the final rename replaces only
what was checked, --overwrite never reaches into what the model reads, and the export follows the umask.

The races run real processes: a child bake whose registered ``gate`` format waits for a file before it
returns, so the test can act while the export sits, written, in its temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bake_fixtures import LLAMA_SITES, setup_model

from bake.cli.main import main as bake_main
from bake.errors import OutputExistsError
from bake.publish.outdir import (
    OutputPathError,
    check_out_dir,
    move_into_place,
    run_scope,
    sigterm_raises,
    temp_folder,
)
from lineas.io import LOCK_SUFFIX, rename_noreplace

GATED = """
import sys, time
from pathlib import Path
from bake.formats.export import ExportResult, register_exporter

def gate(baked, folder, opts):  # an export format that waits (up to 120 s) for the test's go-ahead
    (Path(folder) / "gate-reached").write_text("x")
    go = Path(sys.argv[1])
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return ExportResult("gate")

register_exporter("gate", gate)
from bake.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start_gated(tmp_path: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A bake into ``out`` stopped inside its export (the weights written in its temporary folder)."""
    model_dir, maps_path = tmp_path / "tiny-llama", tmp_path / "llama.safetensors"
    if not model_dir.exists():
        setup_model(tmp_path)
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", GATED, str(go), "--model", str(model_dir), "--maps",
                             str(maps_path), "--out", str(out), "--format", "hf,gate", "--verify-tokens", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        reached = list(out.parent.glob("lineas_tmp_*/gate-reached"))
        if reached:
            assert (reached[0].parent / "model.safetensors").is_file()
            return proc, go
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the export never reached the gate: {proc.communicate()[1][-2000:]}")


def _bake(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bake.cli.main", "--model", str(tmp_path / "tiny-llama"), "--maps",
                           str(tmp_path / "llama.safetensors"), "--out", str(out), "--verify-tokens", "2", *extra],
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- two bakes, one --out
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_second_bake_into_the_same_out_is_refused(tmp_path, overwrite):
    out = tmp_path / "out"
    extra = ("--overwrite",) if overwrite else ()
    first, go = _start_gated(tmp_path, out, *extra)
    try:
        second = _bake(tmp_path, out, *extra)
    finally:
        go.write_text("go")
        _, first_err = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"--out {str(out)!r} is being written by another lineas-bake run (process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("lineas_*")) and not list(tmp_path.glob(f".*{LOCK_SUFFIX}"))


def test_out_created_during_the_bake_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    first, go = _start_gated(tmp_path, out, "--overwrite")  # --overwrite: yet --out was absent when checked
    out.mkdir()
    (out / "mine.txt").write_text("saved while the bake ran")
    go.write_text("go")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 2, err
    assert f"--out {str(out)!r} appeared" in err and "nothing was replaced" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not list(tmp_path.glob("lineas_*")) and not list(tmp_path.glob(f".*{LOCK_SUFFIX}"))


def test_file_saved_into_an_empty_out_during_the_bake_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first, go = _start_gated(tmp_path, out)
    (out / "mine.txt").write_text("saved while the bake ran")
    go.write_text("go")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 2, err
    assert "files were saved into it" in err and str(out) in err and "Traceback" not in err
    assert (out / "mine.txt").read_text() == "saved while the bake ran"
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not list(tmp_path.glob("lineas_*"))


def test_an_untouched_empty_out_is_filled(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first, go = _start_gated(tmp_path, out)
    go.write_text("go")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- the final rename, in process
def _export(out: Path, overwrite: bool, during=None) -> None:
    """check -> temp folder -> (``during``) -> place, as bake.formats.export does."""
    checked = check_out_dir(out, overwrite)
    with sigterm_raises():
        tmp = temp_folder(checked)
        try:
            (tmp / "weights.bin").write_bytes(b"new")
            if during is not None:
                during()
            move_into_place(tmp, checked)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def test_overwrite_replaces_the_folder_checked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_bytes(b"old")
    _export(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["weights.bin"]
    assert not list(tmp_path.glob("lineas_*")) and not list(tmp_path.glob(".*"))


def test_overwrite_refuses_a_folder_swapped_in_after_the_check(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_bytes(b"old")

    def swap():
        out.rename(tmp_path / "checked")
        out.mkdir()
        (out / "other.bin").write_bytes(b"other")

    with pytest.raises(OutputExistsError, match="was replaced or removed since it was checked"):
        _export(out, overwrite=True, during=swap)
    assert (out / "other.bin").read_bytes() == b"other" and (tmp_path / "checked" / "old.bin").read_bytes() == b"old"
    assert not list(tmp_path.glob("lineas_*")) and not list(tmp_path.glob(f".*{LOCK_SUFFIX}"))


def test_a_lock_held_by_this_run_refuses_another_process(tmp_path):
    out = tmp_path / "out"
    code = ("import sys\nfrom bake.publish.outdir import check_out_dir, OutputPathError\n"
            "try:\n    check_out_dir(sys.argv[1], False)\nexcept OutputPathError as e:\n    print(e); sys.exit(2)\n")
    with run_scope():
        check_out_dir(out, False)
        lock = tmp_path / f".out{LOCK_SUFFIX}"
        assert lock.read_text().strip() == str(os.getpid())
        other = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
        assert other.returncode == 2 and f"(process {os.getpid()}" in other.stdout
    assert not lock.exists(), "the lock file is removed when the run ends"
    assert subprocess.run([sys.executable, "-c", code, str(out)], timeout=120).returncode == 0


def test_out_changed_during_a_run_scope_is_refused(tmp_path):
    out = tmp_path / "out"
    with run_scope():
        check_out_dir(out, True)  # the CLI's check, before the bake
        out.mkdir()
        (out / "x").write_text("x")
        with pytest.raises(OutputExistsError, match="changed since it was checked at the start of this run"):
            check_out_dir(out, True)  # the export's check
    assert (out / "x").read_text() == "x"


@pytest.mark.parametrize("kernel", [True, False], ids=["renameat2", "fallback"])
def test_rename_noreplace_never_replaces(tmp_path, monkeypatch, kernel):
    import lineas.io

    if not kernel:
        monkeypatch.setattr(lineas.io, "_renameat2", lambda src, dst: None)
    for kind in ("file", "dir"):
        src, dst = tmp_path / f"src-{kind}", tmp_path / f"dst-{kind}"
        if kind == "file":
            src.write_text("new")
        else:
            src.mkdir()
        dst.mkdir()
        (dst / "kept").write_text("kept")
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
        assert (dst / "kept").read_text() == "kept" and src.exists()
        fresh = tmp_path / f"fresh-{kind}"
        rename_noreplace(src, fresh)
        assert fresh.exists() and not src.exists()


# ----------------------------------------------------------------------------- --out checks
def _hf_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A Hugging Face cache entry made of the tiny model: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    model_dir, _ = setup_model(tmp_path)
    repo = tmp_path / "hub" / "models--me--tiny"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in model_dir.iterdir():
        digest = _sha(f)
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap, blobs


def test_out_holding_the_blobs_of_a_cached_model_is_refused(tmp_path):
    snap, blobs = _hf_cache(tmp_path)
    with pytest.raises(OutputPathError, match="which the model reads"):
        check_out_dir(blobs, True, model_dir=snap)
    with pytest.raises(OutputPathError, match="which the model reads"):
        check_out_dir(blobs.parent, True, model_dir=snap)  # the cache entry: snapshots and blobs
    with pytest.raises(OutputPathError, match="lies inside"):
        check_out_dir(snap / "steered", True, model_dir=snap)
    before = {f.name: _sha(f) for f in blobs.iterdir()}
    check_out_dir(blobs / "sub", True, model_dir=snap)  # a new folder beside the blobs replaces none of them
    check_out_dir(tmp_path / "elsewhere", True, model_dir=snap)
    assert {f.name: _sha(f) for f in blobs.iterdir()} == before


def test_dangling_symlink_out_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match="which does not exist"):
        check_out_dir(tmp_path / "link", False)


def test_symlinked_out_replaces_the_folder_it_points_to(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.bin").write_text("old")
    (tmp_path / "link").symlink_to(real)
    _export(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in real.iterdir()) == ["weights.bin"]


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_and_maps_follow_the_umask(tmp_path, monkeypatch, mask):
    monkeypatch.chdir(tmp_path)
    model_dir, maps_path = setup_model(tmp_path, sites=LLAMA_SITES)
    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        assert bake_main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out),
                          "--verify-tokens", "2"]) == 0
        from lineas.maps import SteeringMaps

        saved = SteeringMaps.load(maps_path).save(tmp_path / "copy.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.name: oct(0o666 & ~mask) for p in files}
    assert stat.S_IMODE(Path(saved).stat().st_mode) == 0o666 & ~mask
    assert json.loads((out / "config.json").read_text())  # the files are the export's, readable


def test_shard_writer_never_follows_or_truncates(tmp_path):
    import torch

    from bake.store.shards import Entry, ShardWriter

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"input")
    (tmp_path / "link.safetensors").symlink_to(victim)
    for name in ("victim.safetensors", "link.safetensors"):
        with pytest.raises(FileExistsError):
            ShardWriter(tmp_path / name, [Entry("w", torch.float32, (1,))])
    assert victim.read_bytes() == b"input"
