"""``lineas-train`` end to end on a tiny model saved to tmp_path (with an offline-built tokenizer)."""

import json

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
