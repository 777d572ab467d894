"""Interrupts and child processes (issue 25, classes 9, 11 and 12): one top-level handler per command.

* Ctrl-C exits 130 and SIGTERM 143, after cleanup, with one line and no traceback, when the export was
  not placed; once it is in place (the final rename done), the interrupt exits 0 with a note saying so.
* An unknown error is one line ending in "please report this", exit 1; ``-v`` prints its traceback.
* llama.cpp's converter and worker (``bake.formats.children``) end with lineas-bake, whatever ends it.

The signal tests run the real CLI in a subprocess on a tiny Llama.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from bake_fixtures import setup_model

from bake.cli.main import main as bake_main

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env | extra


def _wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.stat().st_size:  # written, not only created
            return
        time.sleep(0.05)
    out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    proc.kill()
    raise AssertionError(f"{what} never happened (exit {proc.returncode}): {err[-3000:]}")


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------- SIGTERM / Ctrl-C around the export
# The CLI, with a hook at one point of the export: it writes a marker file and then signals itself or waits.
HOOKED = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import bake.formats.export as export

    when, marker = os.environ["HOOK_WHEN"], Path(os.environ["HOOK_MARKER"])
    if when == "after-rename":  # SIGTERM right after the final rename, inside the export's try block
        real = export.move_into_place

        def placed_then_terminated(tmp, out):
            real(tmp, out)
            marker.write_text("placed")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises before this ends

        export.move_into_place = placed_then_terminated
    else:  # "verify": block once the weights are in the temporary folder; the test sends the signal
        def blocked(folder, report):
            marker.write_text(str(folder))
            time.sleep(120)

        export.write_verification = blocked
    from bake.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def _start(tmp_path: Path, when: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    model_dir, maps_path = setup_model(tmp_path)
    out, marker = tmp_path / "out", tmp_path / "hook-reached"
    proc = subprocess.Popen([sys.executable, "-c", HOOKED, "--model", str(model_dir), "--maps", str(maps_path),
                             "--out", str(out), "--verify-tokens", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=_env(HOOK_WHEN=when, HOOK_MARKER=str(marker)))
    _wait_for(marker, proc, f"the export hook ({when})")
    return proc, out, marker


def test_sigterm_after_the_final_rename_exits_0_and_says_the_export_is_complete(tmp_path):
    proc, out, _ = _start(tmp_path, "after-rename")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert f"note: terminated by SIGTERM after the export was complete: it is in place at {out}" in err
    assert "nothing" not in err and "removed" not in err and "Traceback" not in err
    assert not list(tmp_path.glob("lineas_tmp_*")) and not list(tmp_path.glob("lineas_old_*"))


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_interrupt_before_placement_removes_the_temp_folder(tmp_path, sig, code, said):
    proc, out, marker = _start(tmp_path, "verify")
    tmp = Path(marker.read_text())
    assert tmp.name.startswith(f"lineas_tmp_{proc.pid}_") and (tmp / "model.safetensors").is_file()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"lineas-bake: error: {said}: the export was not written to {out}; nothing was left behind" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert len([line for line in err.splitlines() if said in line]) == 1
    assert not tmp.exists() and not out.exists() and not list(tmp_path.glob("lineas_*"))


def test_sigterm_while_the_model_loads_exits_143_with_one_line(tmp_path):
    """Not only the export: SIGTERM anywhere in the run is one line and 143 (before, it killed the process
    silently outside the export, and with a traceback in parts of it)."""
    model_dir, maps_path = setup_model(tmp_path)
    marker = tmp_path / "loading"
    child = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import bake.api as api
        real = api.check_device
        def slow(device):
            Path({str(marker)!r}).write_text("x")
            time.sleep(120)
        api.check_device = slow
        from bake.cli.main import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, "--model", str(model_dir), "--maps", str(maps_path),
                             "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=_env())
    _wait_for(marker, proc, "the model load")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("lineas-bake: error: terminated by SIGTERM: the export was not")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- unknown errors: one line, -v traceback
def _boom(monkeypatch):
    import bake.cli.main

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(bake.cli.main, "_run", boom)


def test_unknown_error_is_one_line_and_verbose_prints_the_traceback(tmp_path, monkeypatch, capsys):
    model_dir, maps_path = setup_model(tmp_path)
    argv = ["--model", str(model_dir), "--maps", str(maps_path), "--out", str(tmp_path / "out")]
    _boom(monkeypatch)
    capsys.readouterr()  # what building the tiny model printed (transformers 5 shows a progress bar)
    assert bake_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: ZeroDivisionError: boom -- please report this" in err and " -v " in err
    assert bake_main([*argv, "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: boom" in err
    assert err.strip().splitlines()[-1].startswith("lineas-bake: error: internal error: ZeroDivisionError: boom")


def test_train_verbose_flag_prints_the_traceback(tmp_path, monkeypatch, capsys):
    from bake_fixtures import save_tokenizer

    import lineas.learn.train
    from lineas.cli import main as train_main

    model_dir, _ = setup_model(tmp_path)
    save_tokenizer(model_dir)
    (tmp_path / "a.txt").write_text("The capital of France is\n")
    (tmp_path / "b.txt").write_text("in a small village by the sea\n")

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(lineas.learn.train, "learn_maps", boom)
    argv = ["--model", str(model_dir), "--source", str(tmp_path / "a.txt"), "--target", str(tmp_path / "b.txt"),
            "--sites", "model.layers.0.post_attention_layernorm", "--out", str(tmp_path / "m.safetensors"), "--quiet"]
    assert train_main(argv) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert train_main([*argv, "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "please report this" in err


def test_known_error_classes_map_to_their_exit_codes():
    from bake.cli.handler import exit_code_of
    from bake.errors import FoldError, VerificationError
    from bake.formats.llamacpp import LlamaCppCrashed
    from bake.publish.hub_errors import HubAuthError, HubInputError
    from bake.store.shards import ShardFormatError
    from lineas.errors import ModelLoadError
    from lineas.maps import MapsFormatError

    assert exit_code_of(VerificationError("x")) == exit_code_of(LlamaCppCrashed("x")) == 3
    for e in (FoldError("x"), MapsFormatError("x"), ModelLoadError("x"), ShardFormatError("x"), HubInputError("x"),
              OSError(28, "No space left on device", "/x"), OSError(36, "File name too long", "/x")):
        assert exit_code_of(e) == 2, e
    assert exit_code_of(HubAuthError("x")) == 1
    for e in (ZeroDivisionError("x"), KeyError("x"), ValueError("x"), RuntimeError("x"), OSError(5, "I/O error")):
        assert exit_code_of(e) is None, e  # unknown: exit 1 with "please report this"


# ----------------------------------------------------------------------------- children end with their parent
PARENT = textwrap.dedent("""
    import sys, time
    from bake.formats.children import start_child
    child = start_child([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_parent_even_on_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=_env())
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()  # SIGKILL: no finally, no handler runs in the parent
    parent.wait()
    assert _gone(child), "the child outlived its SIGKILLed parent"


def test_a_plain_popen_child_would_outlive_it():
    """The check above can fail: the same child started without start_child survives its parent."""
    code = PARENT.replace("start_child([", "__import__('subprocess').Popen([")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    try:
        assert not _gone(child, timeout=1)
    finally:
        os.kill(child, signal.SIGKILL)


def test_end_child_stops_and_reaps():
    from bake.formats.children import end_child, start_child

    proc = start_child([sys.executable, "-c", "import time; time.sleep(120)"])
    end_child(proc, grace=0)
    assert proc.returncode is not None and not _alive(proc.pid)


FAKE_CONVERTER = textwrap.dedent("""
    import os, time
    from pathlib import Path
    Path(os.environ["CONVERTER_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(120)
""")


def _gguf_bake(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """lineas-bake --format hf,gguf with a stand-in for llama.cpp's converter that hangs (run by the same code,
    bake.formats.gguf.convert, as the real one); returns the bake and the converter's pid once it runs."""
    conv = tmp_path / "converter"
    conv.mkdir()
    (conv / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    pid_file = tmp_path / "converter.pid"
    model_dir, maps_path = setup_model(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "bake.cli.main", "--model", str(model_dir), "--maps",
                             str(maps_path), "--out", str(tmp_path / "out"), "--format", "hf,gguf",
                             "--verify-tokens", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=_env(LINEAS_GGUF_CONVERTER=str(conv), CONVERTER_PID_FILE=str(pid_file)))
    _wait_for(pid_file, proc, "the converter's start")
    time.sleep(0.2)
    return proc, int(pid_file.read_text())


@pytest.mark.gguf
def test_sigterm_during_gguf_conversion_leaves_no_converter(tmp_path):
    proc, converter = _gguf_bake(tmp_path)
    assert _alive(converter)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert _gone(converter, timeout=5), "llama.cpp's converter kept running after lineas-bake ended"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("lineas_*"))


@pytest.mark.gguf
def test_sigkill_during_gguf_conversion_takes_the_converter_too(tmp_path):
    proc, converter = _gguf_bake(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert _gone(converter), "llama.cpp's converter outlived the SIGKILLed lineas-bake"
