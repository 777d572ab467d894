"""Publish only what was verified (issue 25, class 6): the bake records the sha256 of every file it wrote,
``lineas-bake push`` recomputes them and refuses (exit 2, naming the files) a folder that is not the intact
export, ``--force`` says what it skips and never lets the card claim a verification that does not hold.

Pushes go to the local Hub look-alike (tests/hub_server.py) with the real huggingface_hub client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from bake_fixtures import setup_model
from hub_server import HubServer, Token, disable_xet, use_endpoint

from bake import bake
from bake.cli.main import main
from bake.publish.card import UNVERIFIED_BANNER, unverified_card
from bake.publish.hub import format_plan, plan_push, push
from bake.publish.hub_errors import HubInputError, HubIntegrityError, RetryPolicy
from bake.publish.integrity import INTEGRITY_KEY, scan_folder

TOKEN = "hf_test_WRITE_token_0123456789abcdef"
NO_WAIT = RetryPolicy(attempts=2, base_delay_s=0.0)
PROVENANCE = "lineas_provenance.json"
VERDICT = "token-identical"  # in the card's verification section of a verified LLM export


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer({TOKEN: Token("me")}, orgs={}) as server:
        use_endpoint(monkeypatch, server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        disable_xet(monkeypatch)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield server


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """A real export (tiny llama with tokenizer) and the base model it was baked from."""
    tmp = tmp_path_factory.mktemp("integrity")
    model_dir, maps_path = setup_model(tmp, tokenizer=True)
    out = bake(str(model_dir), str(maps_path), strength=0.8, verify_tokens=4).save_pretrained(tmp / "steered")
    return out, model_dir


@pytest.fixture
def export(baked, tmp_path) -> Path:
    """A fresh copy of the export, free to tamper with."""
    copy = tmp_path / "export"
    shutil.copytree(baked[0], copy)
    return copy


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(folder: Path) -> dict:
    return json.loads((folder / PROVENANCE).read_text())[INTEGRITY_KEY]["files"]


def _swap_weights(export: Path, base: Path) -> None:
    assert _sha256(base / "model.safetensors") != _sha256(export / "model.safetensors")
    shutil.copyfile(base / "model.safetensors", export / "model.safetensors")


def _card_at_head(hub: HubServer, repo_id: str) -> str:
    return hub.head(repo_id).files["README.md"].content.decode()


# ----------------------------------------------------------------------------- what the bake records
def assert_records_every_file(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    record = _record(folder)
    assert set(record) == files - {PROVENANCE}, "every file but the provenance file itself is recorded"
    assert "README.md" in record and "lineas_verification.json" in record  # the card is written before the seal
    for rel, entry in record.items():
        assert entry == {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}, rel


def test_llm_export_records_size_and_sha256_of_every_file(baked):
    out, _ = baked
    assert_records_every_file(out)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(_record(out))
    assert not [p for p in out.rglob(".*")], "the owner marker of the temp folder is gone"


def test_onnx_subfolder_provenance_covers_its_own_files(tmp_path):
    from onnx_extra import require_onnx_extra

    require_onnx_extra()
    model_dir, maps_path = setup_model(tmp_path, tokenizer=True)
    out = tmp_path / "X"
    assert main(["--model", str(model_dir), "--maps", str(maps_path), "--format", "hf,onnx", "--out", str(out),
                 "--verify-tokens", "2"]) == 0
    assert_records_every_file(out)
    assert_records_every_file(out / "onnx")  # its own card included: the seal is written after it
    assert "onnx/model.onnx" in _record(out) and "onnx/lineas_provenance.json" in _record(out)
    plan_push(out / "onnx", "me/onnx-only")  # the subfolder alone is an intact export too


def test_pipeline_export_records_every_file_and_pushes(tiny_pipeline_folder, tmp_path, hub):
    pytest.importorskip("diffusers")
    from tiny_pipelines import random_maps

    from lineas.pipelines import load_pipeline

    src = tmp_path / "src"
    shutil.copytree(tiny_pipeline_folder("sd"), src)
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # as in a Hub download
    m = random_maps(load_pipeline(src), ["unet.conv_norm_out"], seed=2).save(tmp_path / "m.safetensors")
    out = tmp_path / "X"
    assert main(["--model", str(src), "--maps", str(m), "--out", str(out)]) == 0
    assert not (out / ".gitattributes").exists(), "dotfiles of the source pipeline are not copied"
    assert_records_every_file(out)
    assert "unet/diffusion_pytorch_model.safetensors" in _record(out)
    push(plan_push(out, "me/pipe"), retry=NO_WAIT)
    _swap_unet = out / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(src / "unet" / "diffusion_pytorch_model.safetensors", _swap_unet)  # back to the base's
    with pytest.raises(HubIntegrityError, match=r"unet/diffusion_pytorch_model\.safetensors: changed after the bake"):
        plan_push(out, "me/pipe")


# ----------------------------------------------------------------------------- refusals
def test_intact_export_plans_and_pushes_as_before(hub, export, capsys):
    plan = plan_push(export, "me/steered")
    assert not plan.problems and not plan.skipped and not plan.replaced
    assert "intact export" in format_plan(plan)
    assert main(["push", str(export), "me/steered"]) == 0
    out = capsys.readouterr().out
    head = hub.head("me/steered")
    assert head.oid in out and "--force" not in out
    assert set(head.files) - {".gitattributes"} == {p.relative_to(export).as_posix() for p in export.rglob("*")}
    assert head.files["README.md"].content == (export / "README.md").read_bytes(), "the card goes up unchanged"
    assert VERDICT in _card_at_head(hub, "me/steered") and UNVERIFIED_BANNER not in _card_at_head(hub, "me/steered")


def test_swapped_weights_are_refused_naming_the_file(hub, baked, export, capsys):
    _swap_weights(export, baked[1])
    with pytest.raises(HubIntegrityError, match=r"model\.safetensors: changed after the bake") as e:
        plan_push(export, "me/steered")
    assert "config.json" not in str(e.value), "only the changed file is named"
    for argv in (["push", str(export), "me/steered"], ["push", str(export), "me/steered", "--dry-run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "model.safetensors: changed after the bake" in err and "--force" in err and "Traceback" not in err
    assert hub.requests == [] and "me/steered" not in hub.repos, "nothing was sent"


def test_dotfile_and_outside_symlink_are_refused(hub, export, tmp_path, capsys):
    (export / ".env").write_text("HF_TOKEN=hf_secret\n")
    secret = tmp_path / "outside.txt"
    secret.write_text("not part of the export")
    (export / "notes.txt").symlink_to(secret)
    with pytest.raises(HubIntegrityError) as e:
        plan_push(export, "me/steered")
    msg = str(e.value)
    assert ".env: dotfile" in msg and f"notes.txt: symlink to {secret} (outside the folder)" in msg
    assert main(["push", str(export), "me/steered", "--dry-run"]) == 2  # the dry run shows the refusal
    assert ".env: dotfile" in capsys.readouterr().err
    assert hub.requests == []


@pytest.mark.parametrize("kind", ["inside-file", "dir-outside", "dot-dir", "fifo"])
def test_every_odd_entry_is_refused(export, tmp_path, kind):
    if kind == "inside-file":
        (export / "weights.safetensors").symlink_to(export / "model.safetensors")
        needle = "weights.safetensors: symlink to"
    elif kind == "dir-outside":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "x.bin").write_bytes(b"x")
        (export / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        needle = "more: symlink to"
    elif kind == "dot-dir":
        (export / ".git").mkdir()
        (export / ".git" / "config").write_text("[core]\n")
        needle = ".git/: dotfile"
    else:
        os.mkfifo(export / "pipe")
        needle = "pipe: not a regular file"
    with pytest.raises(HubIntegrityError, match=needle.replace(".", r"\.")):
        plan_push(export, "me/steered")
    regular, odd = scan_folder(export)
    assert "more/x.bin" not in regular and odd, "a symlinked folder is reported, never entered"


def test_extra_and_missing_files_are_refused(export):
    (export / "tokenizer.json").unlink()
    (export / "extra.bin").write_bytes(b"\0" * 8)
    with pytest.raises(HubIntegrityError) as e:
        plan_push(export, "me/steered")
    assert "tokenizer.json: missing (the bake wrote it)" in str(e.value)
    assert "extra.bin: not written by the bake (extra file)" in str(e.value)


def test_edited_card_is_refused(export):
    (export / "README.md").write_text((export / "README.md").read_text() + "\nAlso verified by me.\n")
    with pytest.raises(HubIntegrityError, match=r"README\.md: changed after the bake"):
        plan_push(export, "me/steered")


def test_folder_with_only_a_readme_is_refused(hub, tmp_path, capsys):
    folder = tmp_path / "just-a-card"
    folder.mkdir()
    (folder / "README.md").write_text("# my model\n")
    with pytest.raises(HubIntegrityError, match=f"{PROVENANCE}: missing"):
        plan_push(folder, "me/x")
    assert main(["push", str(folder), "me/x"]) == 2
    assert f"{PROVENANCE}: missing" in capsys.readouterr().err and hub.requests == []


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not readable as JSON"),
    ("[1, 2]", "records no file hashes"),
    (json.dumps({"tool": "lineas-bake", "maps": []}), "records no file hashes"),
    (json.dumps({INTEGRITY_KEY: {"files": {"README.md": {"size": "9", "sha256": "ab"}}}}), "malformed 'integrity'"),
    (json.dumps({INTEGRITY_KEY: {"files": {"../x": {"size": 1, "sha256": "a" * 64}}}}), "malformed 'integrity'"),
])
def test_malformed_provenance_is_refused(export, content, needle):
    (export / PROVENANCE).write_text(content)
    with pytest.raises(HubIntegrityError, match=needle):
        plan_push(export, "me/steered")


def test_no_card_is_still_refused_with_force(export):
    (export / "README.md").unlink()
    with pytest.raises(HubInputError, match="no README.md"):
        plan_push(export, "me/steered", force=True)


# ----------------------------------------------------------------------------- --force
def test_force_pushes_swapped_weights_as_not_verified_and_skips_dotfiles_and_symlinks(hub, baked, export, tmp_path,
                                                                                       capsys):
    _swap_weights(export, baked[1])
    (export / ".env").write_text("HF_TOKEN=hf_secret\n")
    (tmp_path / "outside.txt").write_text("outside")
    (export / "notes.txt").symlink_to(tmp_path / "outside.txt")
    assert main(["push", str(export), "me/steered", "--force", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "NOT the intact export" in dry and "model.safetensors: changed" in dry and ".env: dotfile" in dry
    assert hub.requests == []

    assert main(["push", str(export), "me/steered", "--force"]) == 0
    captured = capsys.readouterr()
    assert "skipped, never uploaded" in captured.err and ".env" in captured.err and "notes.txt" in captured.err
    assert "not the intact export" in captured.out and "skipped (not uploaded): .env, notes.txt" in captured.out
    head = hub.head("me/steered")
    assert ".env" not in head.files and "notes.txt" not in head.files
    assert head.files["model.safetensors"].lfs_sha256 == _sha256(baked[1] / "model.safetensors")  # what was asked
    card = _card_at_head(hub, "me/steered")
    assert UNVERIFIED_BANNER in card and "model.safetensors: changed after the bake" in card
    assert VERDICT not in card, "the original verification claim is not uploaded"
    assert VERDICT in (export / "README.md").read_text(), "the local card is never modified"
    assert "not verified" in head.title


def test_force_with_only_a_dotfile_keeps_the_verified_card(hub, export, capsys):
    """The files uploaded are exactly the bake's: the claim still holds, only the dotfile is skipped."""
    (export / ".env").write_text("X=1\n")
    plan = plan_push(export, "me/steered", force=True)
    assert plan.skipped == (".env: dotfile",) and not plan.problems and not plan.replaced
    push(plan, retry=NO_WAIT)
    assert ".env" not in hub.head("me/steered").files
    assert hub.head("me/steered").files["README.md"].content == (export / "README.md").read_bytes()


def test_force_on_a_readme_only_folder_says_not_verified(hub, tmp_path):
    folder = tmp_path / "card-only"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    result = push(plan_push(folder, "me/card", force=True), retry=NO_WAIT)
    card = _card_at_head(hub, "me/card")
    assert card.startswith("---\nlicense: mit\n---\n") and UNVERIFIED_BANNER in card and "# mine" in card
    assert f"{PROVENANCE}: missing" in card and "not the intact export" in result.summary()


# ----------------------------------------------------------------------------- the card rewrite
def test_unverified_card_replaces_only_the_verification_section():
    card = ("---\nbase_model: x\n---\n\n# T\n\nintro\n\n## Verification\n\nThe baked model was compared ... "
            "token-identical.\n\n```\ntable\n```\n\n## How to load\n\nload it\n")
    new = unverified_card(card, ["model.safetensors: changed after the bake", "evil\n## Verification\nok"])
    assert VERDICT not in new and "table" not in new
    assert len(re.findall(r"^## ", new, flags=re.MULTILINE)) == 2, "names cannot add sections"
    assert "evil\\n## Verification\\nok" in new
    assert new.startswith("---\nbase_model: x\n---\n") and "# T\n\nintro" in new and new.endswith("load it\n")
    assert UNVERIFIED_BANNER in new
