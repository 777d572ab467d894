"""``--check-runtime``'s fast parts, no serving runtime needed: where each runtime's interpreter is looked for and
the refusals before any work (exit 2), the judgement of a worker's reply, and the worker's error reply.

The runtimes themselves (vLLM, MLX) run in tests/test_serving.py (marker ``serving``, make test-serving).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from bake_fixtures import setup_model

from bake.cli.main import EXIT_BAD_INPUT, main
from bake.formats.serving import (
    ServingRequestError,
    ServingRuntimeFailed,
    check_serving_request,
    interpreter,
    parse_check_runtimes,
    run_runtime,
)
from bake.formats.serving_judge import judge_reply
from bake.registry.llm import Runtime

SOURCE = "hooked model (source weights + steering hooks)"


def test_interpreter_is_found_next_to_this_venv_or_through_the_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv("LINEAS_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / ".venv"))
    assert interpreter("vllm") == tmp_path / ".venv-vllm" / "bin" / "python"
    assert interpreter(Runtime.MLX) == tmp_path / ".venv-mlx" / "bin" / "python"
    monkeypatch.setenv("LINEAS_VLLM_PYTHON", "/opt/elsewhere/python")
    assert interpreter("vllm") == Path("/opt/elsewhere/python")


def test_missing_environment_is_refused_naming_the_interpreter_and_make_target(monkeypatch, tmp_path):
    from bake.cli.handler import exit_code_of

    monkeypatch.delenv("LINEAS_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / ".venv"))
    with pytest.raises(ServingRequestError) as err:
        check_serving_request(parse_check_runtimes("vllm"), ("hf",))
    msg = str(err.value)
    assert str(tmp_path / ".venv-vllm" / "bin" / "python") in msg and "make setup-vllm" in msg
    assert "LINEAS_VLLM_PYTHON" in msg and exit_code_of(err.value) == EXIT_BAD_INPUT
    # an interpreter without the runtime: this one has no mlx_lm
    monkeypatch.setenv("LINEAS_MLX_PYTHON", sys.executable)
    with pytest.raises(ServingRequestError, match=r"has no 'mlx_lm' module.*make setup-mlx"):
        check_serving_request(parse_check_runtimes("mlx"), ("hf",))


@pytest.mark.parametrize("runtimes, formats, dtype, message", [
    ("vllm,tgi", ("hf",), "float32", r"unknown runtime 'tgi'; choose from vllm, mlx"),
    ("mlx", ("onnx",), "float32", r"--check-runtime mlx serves the HF export folder.*add hf"),
    ("vllm", ("hf",), "bfloat16", r"--dtype bfloat16"),
])
def test_bad_requests_are_refused(runtimes, formats, dtype, message):
    with pytest.raises(ServingRequestError, match=message):
        check_serving_request(parse_check_runtimes(runtimes), formats, dtype)


def test_parse_check_runtimes():
    assert parse_check_runtimes("VLLM, mlx,vllm") == (Runtime.VLLM, Runtime.MLX)
    assert parse_check_runtimes(["mlx", "vllm"]) == (Runtime.MLX, Runtime.VLLM)
    assert parse_check_runtimes(None) == parse_check_runtimes("") == ()


def test_cli_refuses_before_any_work(tmp_path, monkeypatch, capsys):
    model_dir, maps = setup_model(tmp_path)
    out = tmp_path / "out"
    base = ["--model", str(model_dir), "--maps", str(maps), "--out", str(out)]
    assert main([*base, "--check-runtime", "sglang"]) == EXIT_BAD_INPUT
    assert "unknown runtime 'sglang'" in capsys.readouterr().err
    monkeypatch.setenv("LINEAS_VLLM_PYTHON", str(tmp_path / "no-such-venv" / "bin" / "python"))
    assert main([*base, "--check-runtime", "vllm"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no-such-venv" in err and "make setup-vllm" in err
    assert not out.exists()


def test_worker_error_is_a_failed_check(tmp_path):
    """The worker run by this interpreter (no mlx_lm here): its one-line error reply becomes the error."""
    with pytest.raises(ServingRuntimeFailed, match=r"mlx could not serve the export .*ModuleNotFoundError"):
        run_runtime(Runtime.MLX, tmp_path, ["hello"], python=Path(sys.executable), timeout=120)


# ----------------------------------------------------------------------------- judging a reply
PROMPTS = ("The movie was", "Hello world")
IDS = [[504, 7704, 436], [19556, 905]]
HOOKED = {(504, 7704, 436): ([5, 6, 7], [-1.0, -0.5, -0.25]), (19556, 905): ([8, 9, 10], [-2.0, -1.0, -0.1]),
          (504, 93, 749, 928, 292): ([5, 6, 7], [-1.0, -0.5, -0.25])}


def _decode(tokens):
    return " ".join(str(t) for t in tokens)


def _row(text, ids, tokens, lps=None, out=None):
    lps = lps or [{str(t): -1.0} for t in tokens]
    return {"text": text, "prompt_ids": ids, "tokens": tokens, "logprobs": lps,
            "text_out": _decode(tokens) if out is None else out}


def _reply(rows):
    return {"ok": True, "prompts": rows, "versions": {"vllm": "0"}, "seconds": 2.0, "new_tokens": 6,
            "tokens_per_s": 3.0}


def test_identical_reply_passes_with_logprob_numbers():
    rows = [_row(PROMPTS[0], IDS[0], [5, 6, 7], [{"5": -1.0, "11": -3.0}, {"6": -0.5}, {"7": -0.26}]),
            _row(PROMPTS[1], IDS[1], [8, 9, 10], [{"8": -2.0}, {"9": -1.0}, {"10": -0.1}])]
    check, details = judge_reply("vllm", _reply(rows), PROMPTS, IDS, HOOKED, SOURCE, _decode)
    assert check.passed and check.gating and (check.greedy_matched, check.greedy_total) == (2, 2)
    assert check.tolerance.name == "vllm-float32" and check.top1 == 1.0
    assert math.isclose(check.max_abs, 0.01, abs_tol=1e-9)
    assert details["tokenization_identical"] == details["greedy_identical"] == details["text_identical"] == 2
    assert details["tokens_per_s"] == 3.0


def test_tokenization_difference_fails_naming_the_first_prompt():
    rows = [_row(PROMPTS[0], [504, 93, 749, 928, 292], [5, 6, 7]), _row(PROMPTS[1], IDS[1], [8, 9, 10])]
    check, details = judge_reply("vllm", _reply(rows), PROMPTS, IDS, HOOKED, SOURCE, _decode)
    assert not check.passed and details["tokenization_identical"] == 1
    [fail] = check.failures
    assert fail.startswith("vllm tokenizes 1/2 prompts differently") and "prompt 0 'The movie was'" in fail
    assert "[504, 93, 749, 928, 292] vs hooked ids [504, 7704, 436]" in fail and "position 1" in fail
    assert check.greedy_matched == 2  # the weights still decode like the hooked model from the runtime's ids


def test_greedy_divergence_fails_naming_the_earliest_prompt_and_text_is_reported():
    rows = [_row(PROMPTS[0], IDS[0], [5, 6, 99]), _row(PROMPTS[1], IDS[1], [8, 42, 10], out="different")]
    check, details = judge_reply("mlx", _reply(rows), PROMPTS, IDS, HOOKED, SOURCE, _decode)
    assert check.tolerance.name == "mlx-float32" and (check.greedy_matched, check.greedy_total) == (0, 2)
    [fail] = check.failures
    assert ("mlx greedy decoding differs from the hooked model (source weights + steering hooks) on 2/2 prompts"
            in fail and "token 1 of prompt 1 'Hello world'" in fail)
    assert [r["first_mismatch"] for r in details["rows"]] == [2, 1]
    assert math.isclose(check.top1, (2 + 1) / (3 + 2))  # positions up to each first divergence
    assert details["text_identical"] == 0  # other tokens: of course another text


def test_a_trimmed_first_space_is_the_same_text():
    """mlx-lm's streaming detokenizer drops the first space of a generation; anything else is another text."""
    from bake.formats.serving_judge import same_text

    assert same_text(" Paris.", "Paris.") and same_text(" Paris.", " Paris.") and same_text("Paris", "Paris")
    assert not same_text(" Paris.", "Paris. ") and not same_text("Paris.", "aris.")
    assert not same_text(" Paris", "ĠParis") and not same_text("  Paris", "Paris")


def test_text_difference_with_the_same_tokens_fails():
    rows = [_row(PROMPTS[0], IDS[0], [5, 6, 7]), _row(PROMPTS[1], IDS[1], [8, 9, 10], out="8 9 10 ")]
    check, details = judge_reply("vllm", _reply(rows), PROMPTS, IDS, HOOKED, SOURCE, _decode)
    assert not check.passed and details["text_identical"] == 1 and details["greedy_identical"] == 2
    [fail] = check.failures
    assert fail.startswith("vllm detokenizes differently") and "prompt 1: '8 9 10 ' vs '8 9 10'" in fail


def test_missing_or_unusable_rows_fail():
    rows = [_row(PROMPTS[0], [], [5, 6, 7])]
    check, _ = judge_reply("vllm", _reply(rows), PROMPTS, IDS, HOOKED, SOURCE, _decode)
    assert any("answered 1 of 2 prompts" in f for f in check.failures)
    assert any("prompt 0 'The movie was'" in f and "cannot be decoded" in f for f in check.failures)
