"""``lineas-train`` end to end on a tiny model saved to tmp_path (with an offline-built tokenizer)."""

import json
from pathlib import Path

import pytest
from tiny import save_tiny

from lineas.cli import build_parser, main
from lineas.maps import SteeringMaps
from lineas.prompts import PromptError, builtin_names, load_prompts

NEG = ["this film is bad and boring", "the food was awful and cold", "a sad dull day again",
       "the service was slow and rude", "i hate this noisy town", "what a bad boring book",
       "the trip was awful and long", "a dull sad song"]
POS = ["this film is good and fun", "the food was great and warm", "a happy bright day again",
       "the service was fast and kind", "i love this quiet town", "what a good fun book",
       "the trip was great and short", "a bright happy song"]


def _save_tokenizer(path, texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"], vocab_size=120))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_tiny("llama", d / "model")
    _save_tokenizer(d / "model", NEG + POS)
    (d / "neg.txt").write_text("\n".join(NEG) + "\n")
    (d / "pos.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in POS) + "\n")
    (d / "pos.json").write_text(json.dumps(POS))
    return d


def _args(d, out, *extra):
    return ["--model", str(d / "model"), "--source", str(d / "neg.txt"), "--target", str(d / "pos.jsonl"),
            "--sites", r"model\.layers\.\d+\.post_attention_layernorm", "--out", str(out), "--quiet", *extra]


def test_end_to_end_lineas(workdir, capsys):
    out = workdir / "maps.safetensors"
    rc = main(_args(workdir, out, "--steps", "15", "--lr", "0.05", "--optimizer", "adam", "--batch-size", "4",
                    "--holdout", "0.25", "--report-json", str(workdir / "report.json")))
    assert rc == 0
    maps = SteeringMaps.load(out)
    meta = maps.metadata
    assert meta["method"] == "lineas"
    assert json.loads(meta["sites"]) == ["model.layers.0.post_attention_layernorm",
                                         "model.layers.1.post_attention_layernorm"]
    assert meta["base_model"] == "model" and meta["model_type"] == "llama"
    assert meta["source"].endswith("neg.txt") and len(meta["source_sha256"]) == 64
    assert json.loads(meta["hyperparameters"])["steps"] == 15
    printed = capsys.readouterr().out
    assert "W2 before" in printed and "held before" in printed and "support:" in printed
    report = json.loads((workdir / "report.json").read_text())
    assert len(report["sites"]) == 2 and len(report["losses"]) == 15


def test_init_linear_act_from_the_command_line(workdir, tmp_path):
    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    assert main(_args(workdir, out, "--init", "linear-act", "--steps", "5", "--report-json", str(report))) == 0
    hp = json.loads(SteeringMaps.load(out).metadata["hyperparameters"])
    assert hp["init"] == "linear-act" and hp["optimizer"] == "adam"
    data = json.loads(report.read_text())
    assert data["config"]["init"] == "linear-act" and isinstance(data["fell_back_to_linear_act"], bool)
    after = sum(r["w2_after"] for r in data["sites"]) / len(data["sites"])
    act_out, act_report = tmp_path / "a.safetensors", tmp_path / "a.json"
    assert main(_args(workdir, act_out, "--method", "linear-act", "--report-json", str(act_report))) == 0
    act = json.loads(act_report.read_text())
    assert after <= sum(r["w2_after"] for r in act["sites"]) / len(act["sites"]) * (1 + 1e-9)


def test_end_to_end_linear_act_with_json_prompts(workdir):
    out = workdir / "act.safetensors"
    args = _args(workdir, out, "--method", "linear-act")
    args[args.index("--target") + 1] = str(workdir / "pos.json")
    assert main(args) == 0
    maps = SteeringMaps.load(out)
    assert maps.metadata["method"] == "linear-act" and maps.support() == 1.0


def test_regex_matching_nothing_exits_2_with_similar_names(workdir, capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    args = _args(workdir, out)
    args[args.index("--sites") + 1] = r"model\.layers\.\d+\.post_attn_layernorm"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "post_attn_layernorm" in err and "similar names" in err and "post_attention_layernorm" in err
    assert not out.exists()


def test_missing_prompt_file_exits_2(workdir, capsys, tmp_path):
    args = _args(workdir, tmp_path / "m.safetensors")
    args[args.index("--source") + 1] = str(tmp_path / "nope.txt")
    assert main(args) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_model_exits_2(workdir, capsys, tmp_path):
    args = _args(workdir, tmp_path / "m.safetensors")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(args) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_bad_numbers_exit_2(workdir, capsys, tmp_path):
    assert main(_args(workdir, tmp_path / "m.safetensors", "--steps", "0")) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(_args(workdir, tmp_path / "m.safetensors", "--method", "magic")) == 2


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--source", "--target", "--sites", "--method", "--steps", "--lr", "--batch-size",
                "--max-length", "--sparsity-l1", "--sparsity-group", "--seed", "--device", "--dtype", "--out",
                "--holdout", "--optimizer", "--trust-remote-code", "import-mlact", "--ignore-quantile-gate"):
        assert opt in text, opt
    parser_opts = {o for a in build_parser()._actions for o in a.option_strings}
    assert all(o in text for o in parser_opts)


def test_prompt_files_and_builtins(workdir, tmp_path):
    assert load_prompts(str(workdir / "neg.txt")).texts == tuple(NEG)
    assert load_prompts(str(workdir / "pos.jsonl")).texts == tuple(POS)
    assert load_prompts(str(workdir / "pos.json")).texts == tuple(POS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(PromptError, match="text"):
        load_prompts(str(bad))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(PromptError, match="unknown built-in"):
        load_prompts("builtin:definitely-not-a-set")
    for name in builtin_names():
        a, b = load_prompts(name), load_prompts("builtin:" + name)
        assert a.texts == b.texts and len(a) > 0 and a.description == "builtin:" + name


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", ["parent-is-a-file", "is-a-directory", "under-a-file-deeper"])
def test_bad_out_fails_before_loading_the_model(workdir, capsys, tmp_path, case):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out = {"parent-is-a-file": tmp_path / "afile" / "m.safetensors", "is-a-directory": tmp_path / "adir",
           "under-a-file-deeper": tmp_path / "afile" / "sub" / "m.safetensors"}[case]
    before = _listing(tmp_path)
    args = _args(workdir, out)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")  # loading it would fail with another message
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "no-such-model" not in err, err
    assert _listing(tmp_path) == before


def _main_as_unprivileged_user(args) -> tuple[int, str]:
    """``main(args)`` in a forked child that drops to user ``nobody`` when the tests run as root
    (root may write into a 0o555 folder); returns its exit code and stderr."""
    import io
    import os
    import sys

    import lineas.collect  # noqa: E401,F401  (no imports as nobody)

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(read_fd)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            sys.stderr = io.StringIO()
            code = main(args)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os.write(write_fd, sys.stderr.getvalue().encode())
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        err = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_out_under_a_read_only_folder_fails_up_front(workdir):
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="lineas-ro-"))  # not under tmp_path: user nobody must reach it
    base.chmod(0o755)
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / "m.safetensors"
        args = _args(workdir, out)
        args[args.index("--model") + 1] = str(base / "no-such-model")
        code, err = _main_as_unprivileged_user(args)
        assert code == 2, err
        assert str(out) in err and "cannot write" in err, err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
        shutil.rmtree(base)


def test_bad_config_names_the_flag(workdir, capsys, tmp_path):
    for extra, flag in ((["--batch-size", "0"], "--batch-size"), (["--holdout", "1.5"], "--holdout"),
                        (["--lr", "nan"], "--lr"), (["--betas", "0.9", "1.0"], "--betas"),
                        (["--sparsity-group", "-1"], "--sparsity-group")):
        assert main(_args(workdir, tmp_path / "m.safetensors", *extra)) == 2
        assert flag in capsys.readouterr().err, extra
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_defaults_are_the_train_config_defaults():
    from lineas.cli import train_config
    from lineas.learn.train import TrainConfig

    args = build_parser().parse_args(["--model", "m", "--source", "a", "--target", "b", "--sites", "x",
                                      "--out", "o.safetensors"])
    assert train_config(args) == TrainConfig()
