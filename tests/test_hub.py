"""Publishing to a local Hub look-alike (tests/hub_server.py) with the real huggingface_hub client.

No internet: the fixture starts the server on 127.0.0.1 and points huggingface_hub at it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from bake_fixtures import assert_close_rel, hooked_and_base, load, logits, setup_model
from hub_server import HubServer, Token, XetListing, disable_xet, use_endpoint
from onnx_extra import require_onnx_extra

from bake import bake
from bake.publish.hub import format_plan, make_api, plan_push, push, verify_remote
from bake.publish.hub_errors import (
    HubAuthError,
    HubInputError,
    HubNotFoundError,
    HubUnavailableError,
    HubVerificationError,
    RetryPolicy,
)

TOKEN = "hf_test_WRITE_token_0123456789abcdef"
READ_TOKEN = "hf_test_READ_token_0123456789abcdef"
STRENGTH = 0.8
NO_WAIT = RetryPolicy(attempts=3, base_delay_s=0.0)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    tokens = {TOKEN: Token("me"), READ_TOKEN: Token("me", write=False), "hf_other": Token("someone")}
    with HubServer(tokens, orgs={"lab": {"me"}, "theirs": {"someone"}}) as server:
        use_endpoint(monkeypatch, server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        disable_xet(monkeypatch)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login, no shared cache
        yield server


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A real lineas-bake export (tiny llama with tokenizer) plus what it must reproduce."""
    tmp = tmp_path_factory.mktemp("export")
    model_dir, maps_path = setup_model(tmp, tokenizer=True)
    baked = bake(str(model_dir), str(maps_path), strength=STRENGTH, verify_tokens=4)
    out = baked.save_pretrained(tmp / "steered")
    return out, model_dir, maps_path


def _snapshot(hub: HubServer, repo_id: str, revision: str, dest):
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, endpoint=hub.endpoint, token=TOKEN, cache_dir=dest)


# ----------------------------------------------------------------------------- happy path
def test_push_verify_download_reload_matches_hooked(hub, export_dir, tmp_path):
    out, model_dir, maps_path = export_dir
    plan = plan_push(out, "me/steered")
    result = push(plan, retry=NO_WAIT)
    head = hub.head("me/steered")
    assert result.commit_oid == head.oid and result.commit_url.endswith(f"/me/steered/commit/{head.oid}")
    assert result.commit_url.startswith(hub.endpoint)
    assert {f.path for f in plan.files} | {".gitattributes"} == set(head.files)
    assert "README.md" in head.files, "the model card is part of the upload"
    assert head.files["model.safetensors"].lfs_sha256 is not None  # weights went through LFS
    assert head.files["config.json"].lfs_sha256 is None  # small text through the commit payload

    snap = _snapshot(hub, "me/steered", "main", tmp_path / "dl")
    hooked, base = hooked_and_base(model_dir, maps_path, STRENGTH)
    assert not torch.allclose(hooked, base, atol=1e-3), "the maps must change the model for this test to mean anything"
    assert_close_rel(logits(load(snap)), hooked)
    for f in plan.files:  # byte-identical round trip
        assert (out / f.path).read_bytes() == (tmp_path / "dl").joinpath(
            "models--me--steered", "snapshots", head.oid, f.path).read_bytes()


def test_push_to_a_branch_private(hub, export_dir):
    out, *_ = export_dir
    result = push(plan_push(out, "lab/steered", revision="exp-1", private=True, commit_message="try λ=0.8"),
                  retry=NO_WAIT)
    repo = hub.repos["lab/steered"]
    assert repo.private and repo.branches["exp-1"] == result.commit_oid
    assert repo.commits[repo.branches["main"]].title == "initial commit"  # main untouched
    assert repo.commits[result.commit_oid].title == "try λ=0.8"
    assert result.revision == "exp-1"


def test_second_identical_push_is_a_verified_no_op(hub, export_dir):
    out, *_ = export_dir
    first = push(plan_push(out, "me/steered"), retry=NO_WAIT)
    second = push(plan_push(out, "me/steered"), retry=NO_WAIT)
    assert second.commit_oid == first.commit_oid
    assert len(hub.calls("POST", r"/commit/")) == 1


# ----------------------------------------------------------------------------- dry run and bad input
def test_dry_run_plan_touches_no_network(hub, export_dir):
    out, *_ = export_dir
    plan = plan_push(out, "me/steered", revision="dev", private=True)
    text = format_plan(plan)
    assert f"{hub.endpoint}/me/steered" in text and "branch dev" in text and "private" in text
    for f in plan.files:
        assert f.path in text
    assert "README.md" in {f.path for f in plan.files}
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["steered", "me/", "/x", "a/b/c", "me/bad name"])
def test_bad_repo_id(export_dir, repo_id):
    with pytest.raises(HubInputError, match="repo"):
        plan_push(export_dir[0], repo_id)


def test_missing_folder_and_missing_card(tmp_path):
    with pytest.raises(HubInputError, match="does not exist"):
        plan_push(tmp_path / "nope", "me/x")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubInputError, match="README.md"):
        plan_push(tmp_path, "me/x")


def test_endpoint_must_match_huggingface_hub(hub, export_dir):
    with pytest.raises(HubInputError, match="HF_ENDPOINT"):
        plan_push(export_dir[0], "me/x", endpoint="http://127.0.0.1:1")


# ----------------------------------------------------------------------------- failures
def test_401_bad_token(hub, export_dir, monkeypatch):
    out, *_ = export_dir
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value_xyz")
    with pytest.raises(HubAuthError) as e:
        push(plan_push(out, "me/steered"), retry=NO_WAIT)
    msg = str(e.value)
    assert "401" in msg and "HF_TOKEN" in msg and str(out) in msg and "lineas-bake push" in msg
    assert "hf_wrong_token_value_xyz" not in msg
    assert not hub.repos


def test_403_read_only_token(hub, export_dir, monkeypatch):
    out, *_ = export_dir
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(HubAuthError, match="403") as e:
        push(plan_push(out, "me/steered"), retry=NO_WAIT)
    assert "write access" in str(e.value) and str(out) in str(e.value)


def test_403_other_namespace(hub, export_dir):
    with pytest.raises(HubAuthError, match="'theirs'"):
        push(plan_push(export_dir[0], "theirs/steered"), retry=NO_WAIT)


def test_404_unknown_namespace(hub, export_dir):
    out, *_ = export_dir
    with pytest.raises(HubNotFoundError, match="404") as e:
        push(plan_push(out, "ghost/steered"), retry=NO_WAIT)
    assert "'ghost'" in str(e.value) and str(out) in str(e.value)


def test_no_token_at_all(hub, export_dir, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubAuthError, match="no Hugging Face token"):
        push(plan_push(export_dir[0], "me/steered"), retry=NO_WAIT)
    assert hub.requests == []


def test_500_then_success_is_retried(hub, export_dir):
    out, *_ = export_dir
    hub.fail_next("POST", r"/api/models/me/steered/commit/", 500, count=1)
    hub.fail_next("POST", r"/api/repos/create", 503, count=1)
    waits = []
    result = push(plan_push(out, "me/steered"), retry=RetryPolicy(attempts=3, base_delay_s=0.25), sleep=waits.append)
    assert [s for _, _, s in hub.calls("POST", r"/commit/")] == [500, 200]
    assert [s for _, _, s in hub.calls("POST", r"/api/repos/create")] == [503, 200]
    assert waits == [0.25, 0.25]  # one backoff per failed step
    assert len(hub.repos["me/steered"].commits) == 2  # initial + ours, no duplicate
    assert result.commit_oid == hub.head("me/steered").oid


def test_persistent_500_gives_up_with_bounded_backoff(hub, export_dir):
    out, *_ = export_dir
    hub.fail_next("POST", r"/commit/", 500, count=100)
    waits = []
    with pytest.raises(HubUnavailableError) as e:
        push(plan_push(out, "me/steered"), retry=RetryPolicy(attempts=4, base_delay_s=1.0, max_delay_s=3.0),
             sleep=waits.append)
    assert waits == [1.0, 2.0, 3.0]
    assert len(hub.calls("POST", r"/commit/")) == 4
    msg = str(e.value)
    assert "500" in msg and "4 attempts" in msg and str(out) in msg and "lineas-bake push" in msg


def test_connection_refused_is_retried_then_reported(export_dir, monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    use_endpoint(monkeypatch, dead)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    waits = []
    with pytest.raises(HubUnavailableError, match="connection error: ConnectionRefusedError") as e:
        push(plan_push(export_dir[0], "me/steered"), retry=RetryPolicy(attempts=2, base_delay_s=0.0),
             sleep=waits.append)
    assert len(waits) == 1 and str(export_dir[0]) in str(e.value)


def test_verification_catches_a_mismatch(hub, export_dir, tmp_path):
    """Verification compares content hashes, so a stale remote is detected (the check can fail)."""
    import shutil

    out, *_ = export_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = push(plan_push(copy, "me/steered"), retry=NO_WAIT)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    changed = plan_push(copy, "me/steered", force=True)  # no longer the intact export: only --force plans it
    api, _ = make_api(changed)
    with pytest.raises(HubVerificationError, match="config.json: remote"):
        verify_remote(api, changed, result.commit_oid)
    assert verify_remote(api, plan_push(out, "me/steered"), result.commit_oid) == ()


def test_retry_is_decided_by_status_and_socket_errors_not_library_class_names():
    """requests (hub < 1.0) and httpx (hub >= 1.0) wrap a refused connection in their own classes; what both
    keep is the chain down to Python's socket error, so that is what is looked at."""
    from bake.publish.hub_errors import is_retryable

    class LibraryConnectError(Exception):  # stands in for any HTTP library's wrapper, whatever its name
        pass

    def wrapped(cause: BaseException) -> Exception:
        try:
            try:
                raise cause
            except BaseException as e:
                raise LibraryConnectError("could not connect") from e
        except LibraryConnectError as outer:
            return outer

    assert is_retryable(wrapped(ConnectionRefusedError(111, "refused")))
    assert is_retryable(wrapped(TimeoutError("read timed out")))
    assert not is_retryable(wrapped(ValueError("bad header")))  # a wrapper alone is not a transport failure
    assert not is_retryable(LibraryConnectError("no cause"))


@pytest.mark.parametrize("listing", [XetListing.WITH_LFS, XetListing.XET_ONLY])
def test_xet_hashes_in_the_listing_are_verified(hub, export_dir, tmp_path, listing):
    """Xet-stored files: listed with their sha256 and a Xet hash (as the Hub does), or with a Xet hash alone,
    which is then compared with the local Xet hash from hf_xet; a changed weight file is caught either way."""
    import shutil

    pytest.importorskip("hf_xet", reason="Xet hashes are computed by hf_xet, a dependency of huggingface_hub")
    out, *_ = export_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    from huggingface_hub.hf_api import RepoFile

    hub.xet_listing = listing
    if listing is XetListing.XET_ONLY and not hasattr(RepoFile(path="a", size=0, oid="0" * 40), "xet_hash"):
        # huggingface_hub 0.36 drops xetHash from listings: such a file cannot be confirmed, and is not passed.
        with pytest.raises(HubVerificationError, match="model.safetensors: remote git blob"):
            push(plan_push(copy, "me/steered"), retry=NO_WAIT)
        return
    result = push(plan_push(copy, "me/steered"), retry=NO_WAIT)
    plan = plan_push(copy, "me/steered")
    api, _ = make_api(plan)
    listed = {e.path: e for e in api.list_repo_tree("me/steered", recursive=True, revision=result.commit_oid)}
    assert (listed["model.safetensors"].lfs is None) == (listing is XetListing.XET_ONLY)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # same size, other bytes
    (copy / "model.safetensors").write_bytes(bytes(data))
    what = "Xet hash" if listing is XetListing.XET_ONLY else "LFS sha256"
    with pytest.raises(HubVerificationError, match=f"model.safetensors: remote {what}"):
        verify_remote(api, plan_push(copy, "me/steered", force=True), result.commit_oid)


# ----------------------------------------------------------------------------- secrecy
def test_token_never_appears_in_output_or_logs(hub, export_dir, monkeypatch, capfd, caplog):
    out, *_ = export_dir
    caplog.set_level(logging.DEBUG)  # every logger, including huggingface_hub / urllib3 debug logs
    push(plan_push(out, "me/steered"), retry=NO_WAIT)
    hub.fail_next("POST", r"/commit/", 500, count=10)
    with pytest.raises(HubUnavailableError) as e:
        push(plan_push(out, "me/other"), retry=NO_WAIT)
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(HubAuthError) as e2:
        push(plan_push(out, "me/third"), retry=NO_WAIT)
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text + str(e.value) + str(e2.value)
    assert "retry 1/2" in caplog.text  # the capture works: our retry warning is in it
    assert TOKEN not in text and READ_TOKEN not in text


# ----------------------------------------------------------------------------- command line
def test_cli_push_prints_verified_commit(hub, export_dir, capsys):
    from bake.cli.main import main

    out, *_ = export_dir
    rc = main(["push", str(out), "me/steered", "--commit-message", "first upload"])
    captured = capsys.readouterr()
    head = hub.head("me/steered")
    assert rc == 0, captured.err
    assert f"{hub.endpoint}/me/steered/commit/{head.oid}" in captured.out and "verified" in captured.out
    assert head.title == "first upload"
    assert TOKEN not in captured.out + captured.err


def test_cli_push_dry_run(hub, export_dir, capsys):
    from bake.cli.main import main

    out, *_ = export_dir
    assert main(["push", str(out), "me/steered", "--dry-run", "--private", "--branch", "dev"]) == 0
    text = capsys.readouterr().out
    assert "would upload" in text and f"{hub.endpoint}/me/steered" in text and "README.md" in text
    assert "branch dev" in text and "private" in text
    assert hub.requests == []


def test_cli_push_errors_exit_codes(hub, export_dir, capsys, monkeypatch, tmp_path):
    from bake.cli.main import main

    out, *_ = export_dir
    assert main(["push", str(out), "not-a-repo-id"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), "me/x"]) == 2
    monkeypatch.setenv("HF_TOKEN", "hf_bad_token_for_cli_test")
    assert main(["push", str(out), "me/steered"]) == 1
    err = capsys.readouterr().err
    assert "401" in err and f"lineas-bake push {out} me/steered" in err
    assert "hf_bad_token_for_cli_test" not in err


def test_cli_bake_then_push_to_hub(hub, tmp_path, capsys):
    from bake.cli.main import main

    model_dir, maps_path = setup_model(tmp_path)
    out = tmp_path / "baked"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--verify-tokens", "4", "--out", str(out),
               "--push-to-hub", "lab/baked", "--private", "--revision", "v1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    repo = hub.repos["lab/baked"]
    head = repo.commits[repo.branches["v1"]]
    assert repo.private and {"README.md", "model.safetensors", "lineas_verification.json"} <= set(head.files)
    assert head.oid in captured.out


def test_cli_push_to_hub_failure_keeps_the_export(hub, tmp_path, capsys, monkeypatch):
    from bake.cli.main import main

    model_dir, maps_path = setup_model(tmp_path)
    out = tmp_path / "baked"
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--verify-tokens", "4", "--out", str(out),
               "--push-to-hub", "me/baked"])
    err = capsys.readouterr().err
    assert rc == 1 and "403" in err and f"lineas-bake push {out.resolve()} me/baked" in err
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_cli_push_options_are_checked_before_baking(tmp_path, capsys):
    from bake.cli.main import main

    model_dir, maps_path = setup_model(tmp_path)
    common = ["--model", str(model_dir), "--maps", str(maps_path), "--out", str(tmp_path / "o")]
    assert main([*common, "--push-to-hub", "no-slash"]) == 2
    assert "'no-slash'" in capsys.readouterr().err
    assert main([*common, "--private"]) == 2
    assert "--push-to-hub" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_push_in_a_fresh_process_reads_hf_endpoint(hub, export_dir):
    """The user's path: HF_ENDPOINT in the environment, huggingface_hub imported fresh, no patching."""
    import os
    import subprocess
    import sys

    out, *_ = export_dir
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN}
    proc = subprocess.run([sys.executable, "-m", "bake.cli.main", "push", str(out), "me/fresh", "-v"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{hub.endpoint}/me/fresh/commit/{hub.head('me/fresh').oid}" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr


def test_acceptance_bake_hf_onnx_push_download_reproduces_hooked(hub, tmp_path, capsys):
    """lineas-bake --format hf,onnx --out X; lineas-bake push X me/steered; download; both formats == hooked."""
    require_onnx_extra()
    from bake.cli.main import main
    from bake.formats.onnx_runtime import load_ort, ort_runner

    model_dir, maps_path = setup_model(tmp_path, tokenizer=True)
    out = tmp_path / "X"
    assert main(["--model", str(model_dir), "--maps", str(maps_path), "--strength", str(STRENGTH),
                 "--format", "hf,onnx", "--out", str(out), "--verify-tokens", "4"]) == 0
    assert main(["push", str(out), "me/steered"]) == 0
    assert hub.head("me/steered").oid in capsys.readouterr().out
    snap = _snapshot(hub, "me/steered", "main", tmp_path / "dl")

    hooked, base = hooked_and_base(model_dir, maps_path, STRENGTH)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert_close_rel(logits(load(snap)), hooked)
    from tiny import random_ids

    ids = random_ids(2, 16, 128, seed=7)  # the ids bake_fixtures.logits uses
    ort_logits = ort_runner(load_ort(Path(snap) / "onnx"))(ids, torch.ones_like(ids))
    assert_close_rel(ort_logits, hooked, rel=1e-4)


def test_cli_bake_dry_run_with_push_says_where(hub, tmp_path, capsys):
    from bake.cli.main import main

    model_dir, maps_path = setup_model(tmp_path)
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(tmp_path / "o"), "--dry-run",
               "--push-to-hub", "lab/x", "--branch", "b1"])
    text = capsys.readouterr().out
    assert rc == 0 and f"{hub.endpoint}/lab/x" in text and "branch b1" in text and "README.md" in text
    assert hub.requests == [] and not (tmp_path / "o").exists()
