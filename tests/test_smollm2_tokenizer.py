"""The embedded SmolLM2's tokenizer files tokenize text as upstream SmolLM2 does, in this transformers and in
the other major, so that a runtime given *text* (vLLM, MLX, transformers 5) sees the ids the model was steered on.

The GGUF loader names the class ``LlamaTokenizer``; saved as such, transformers 5.16-5.19 rebuilt a Metaspace
tokenizer and "The movie was" became [504, 93, 749, 928, 292] (lineas.tokenizer_files.plain_fast_tokenizer).  The
ids below are upstream SmolLM2-135M-Instruct's (byte-level BPE, no BOS).
"""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from lineas.models import smollm2_checkpoint

UPSTREAM = {"The movie was": [504, 7704, 436], "naïve café": [3546, 46494, 37366]}
TEXTS = ["The movie was", "Hello, world! It's 3.14 — ok?\n  indented", "naïve café", " leading space , and ' quotes"]
CHECK = """
import json, sys
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
ids = [t(x)["input_ids"] for x in texts]
print(json.dumps({"ids": ids, "text": [t.decode(i, skip_special_tokens=True) for i in ids]}))
"""


def _check(tokenizer_ids, decoded):
    for text, want in UPSTREAM.items():
        assert tokenizer_ids[TEXTS.index(text)] == want, (text, tokenizer_ids[TEXTS.index(text)])
    assert decoded == TEXTS  # byte markers (Ġ, Ċ) or cleaned-up spaces would show here


def test_tokenizer_files_name_a_plain_fast_tokenizer():
    cfg = json.loads((smollm2_checkpoint() / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["clean_up_tokenization_spaces"] is False
    assert cfg["eos_token"] == "<|im_end|>"
    spec = json.loads((smollm2_checkpoint() / "tokenizer.json").read_text(encoding="utf-8"))
    # byte-level BPE as upstream writes it: with byte_fallback or a SentencePiece decoder chain, llama.cpp's
    # converter writes a Llama SentencePiece vocabulary and llama.cpp aborts tokenizing text
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is False
    assert spec["decoder"]["type"] == "ByteLevel"


def test_text_round_trip_in_this_transformers():
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    ids = [tok(t)["input_ids"] for t in TEXTS]
    _check(ids, [tok.decode(i, skip_special_tokens=True) for i in ids])
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_the_check_fails_on_broken_files(tmp_path):
    """Files whose decoder leaves the byte markers in (what vLLM returned with the old files) must fail the check,
    else it proves nothing."""
    src = smollm2_checkpoint()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            (tmp_path / name).write_bytes((src / name).read_bytes())
    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    spec["decoder"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    with pytest.raises(AssertionError):
        _check(ids, [tok.decode(i, skip_special_tokens=True) for i in ids])


@pytest.mark.crossversion
def test_text_round_trip_in_the_other_major():
    """The folder this transformers wrote, tokenized by the other major (make test-cross sets both)."""
    other = [os.environ.get(v) for v in ("LINEAS_PYTHON_TF4", "LINEAS_PYTHON_TF5")]
    if not all(other):
        pytest.fail("LINEAS_PYTHON_TF4 and LINEAS_PYTHON_TF5 must be set (make test-cross)")
    for exe in other:
        proc = subprocess.run([exe, "-c", CHECK, str(smollm2_checkpoint()), json.dumps(TEXTS)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        _check(got["ids"], got["text"])
    assert sys.executable  # this interpreter's own check is test_text_round_trip_in_this_transformers
