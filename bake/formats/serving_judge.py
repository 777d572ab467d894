"""Judging a serving runtime's reply (:mod:`bake.formats.serving_worker`) against the hooked model.

Pure bookkeeping on plain lists, so it is tested without any runtime: :func:`judge_reply` compares, per
prompt, the runtime's prompt ids with the hooked tokenizer's, its greedy tokens with the hooked model's from
the same ids, its log-probability of each hooked greedy token with the hooked one (up to the first divergence:
after it the two decode different contexts), and its decoded text with the hooked tokens decoded (text in,
text out: all but the log-probabilities gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from bake.formats.tokenization import tokenization_mismatch
from bake.verify.check import CheckResult, first_divergence
from bake.verify.tolerances import Row, get_tolerance

ROWS = {"vllm": Row.VLLM_F32, "mlx": Row.MLX_F32}
LABELS = {"vllm": "vllm float32 (served)", "mlx": "mlx float32 (served)"}


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def tokenization_failure(runtime: str, rows: Sequence[dict]) -> str | None:
    """The failure naming the first prompt the runtime tokenizes differently, or None."""
    return tokenization_mismatch(runtime, [r["text"] for r in rows], [r["hooked_ids"] for r in rows],
                                 [r["runtime_ids"] for r in rows])


def same_text(hooked: str, runtime: str) -> bool:
    """The runtime's text is the hooked tokens' text, or that text without its one leading space: mlx-lm's
    streaming detokenizers drop the first space of every generation by design (mlx_lm/tokenizer_utils.py
    ``_maybe_trim_space``), so ``mlx_lm.generate`` prints "Paris." where the tokens decode to " Paris."."""
    return runtime == hooked or (hooked.startswith(" ") and runtime == hooked[1:])


def greedy_failure(runtime: str, rows: Sequence[dict], source: str, n_new: int) -> str | None:
    """The failure naming the prompt with the earliest greedy divergence, or None."""
    differ = [r for r in rows if r["identical"] is False]
    if not differ:
        return None
    r = min(differ, key=lambda r: r["first_mismatch"])
    return (f"{runtime} greedy decoding differs from the {source} on {len(differ)}/{len(rows)} prompts ({n_new} "
            f"tokens); first divergence at token {r['first_mismatch']} of prompt {r['index']} {_short(r['text'])}")


def judge_reply(runtime: str, reply: Mapping, prompts: Sequence[str], want_ids: Sequence[Sequence[int]],
                hooked: Mapping[tuple, tuple[list[int], list[float]]], source: str,
                decode: Callable[[list[int]], str], n_new: int | None = None) -> tuple[CheckResult, dict]:
    """``reply``: the worker's; ``want_ids``: the hooked tokenizer's ids per prompt; ``hooked``: the hooked
    greedy tokens and their log-probabilities, keyed by the prompt ids they continue.  Returns the check (row
    ``vllm-float32`` / ``mlx-float32``) and the details for the report."""
    got_rows = list(reply.get("prompts") or [])
    n_new = n_new or max((len(r.get("tokens", [])) for r in got_rows), default=0)
    rows, failures = [], []
    if len(got_rows) != len(prompts):
        failures.append(f"{runtime} answered {len(got_rows)} of {len(prompts)} prompts")
    lp_diff, agree, compared = 0.0, 0, 0
    for i, (text, want, got) in enumerate(zip(prompts, want_ids, got_rows)):
        ids = [int(t) for t in got.get("prompt_ids", [])]
        want = [int(t) for t in want]
        first_id = first_divergence(want, ids)
        if first_id is None and len(want) != len(ids):
            first_id = min(len(want), len(ids))
        tokens = [int(t) for t in got.get("tokens", [])]
        row = {"index": i, "text": text, "hooked_ids": want, "runtime_ids": ids,
               "tokenization_identical": first_id is None, "first_id_mismatch": first_id, "candidate": tokens,
               "runtime_text": got.get("text_out", "")}
        ref = hooked.get(tuple(ids))
        if ref is None:
            row.update(identical=None, first_mismatch=None, reference=None)
            failures.append(f"prompt {i} {_short(text)}: {runtime}'s ids {ids} cannot be decoded by the hooked "
                            "model (empty or outside its vocabulary)")
            rows.append(row)
            continue
        ref_tokens, ref_lps = ref
        first = first_divergence(ref_tokens, tokens)
        if first is None and len(tokens) != len(ref_tokens):
            first = min(len(tokens), len(ref_tokens))
        upto = len(ref_tokens) if first is None else first + 1  # the same context up to the first divergence
        diffs = []
        for j, (w, lps) in enumerate(zip(ref_tokens[:upto], (got.get("logprobs") or [])[:upto])):
            if str(w) in lps and math.isfinite(float(lps[str(w)])):
                diffs.append(abs(float(lps[str(w)]) - ref_lps[j]))
        compared += min(upto, len(tokens))
        agree += min(upto, len(tokens)) - (first is not None and first < len(tokens))
        hooked_text = decode(ref_tokens)
        row.update(identical=first is None, first_mismatch=first, reference=ref_tokens,
                   prompt_len=len(ids), path=f"{runtime}, text prompt, {len(ref_tokens)} tokens",
                   hooked_text=hooked_text, text_identical=same_text(hooked_text, row["runtime_text"]),
                   max_logprob_abs_diff=max(diffs) if diffs else None, logprobs_compared=len(diffs))
        lp_diff = max([lp_diff, *diffs])
        rows.append(row)
    for fail in (tokenization_failure(runtime, rows), greedy_failure(runtime, rows, source, n_new)):
        if fail:
            failures.append(fail)
    # Same tokens, other text: the user reads text, so a detokenizer that leaves byte markers ("Ġa Ġway", what
    # vLLM returned with the embedded model's old tokenizer files) fails the check like a wrong token does.
    texts = [r for r in rows if r["identical"] and r.get("text_identical") is False]
    if texts:
        r = texts[0]
        failures.append(f"{runtime} detokenizes differently: its text differs from the same tokens decoded by the "
                        f"export's tokenizer on {len(texts)}/{len(rows)} prompts; first: prompt {r['index']}: "
                        f"{_short(r['runtime_text'])} vs {_short(r['hooked_text'])}")
    tol = get_tolerance(ROWS[runtime])
    checked = [r for r in rows if r["identical"] is not None]
    matched = sum(bool(r["identical"]) for r in checked)
    detail = [{k: r.get(k) for k in ("prompt_len", "identical", "first_mismatch", "reference", "candidate", "path")}
              for r in checked]
    check = CheckResult(label=LABELS[runtime], tolerance=tol, max_abs=lp_diff if compared else float("nan"),
                        max_rel=float("nan"), mean_kl=float("nan"), top1=agree / compared if compared else float("nan"),
                        greedy_matched=matched, greedy_total=len(rows), per_probe=[], failures=failures,
                        greedy_detail=detail)
    seconds = reply.get("seconds")
    details = {
        "passed": check.passed, "failures": failures, "versions": reply.get("versions", {}),
        "interpreter": reply.get("interpreter"), "tokenization_identical": sum(r["tokenization_identical"]
                                                                              for r in rows),
        "greedy_identical": matched, "text_identical": sum(bool(r.get("text_identical")) for r in rows),
        "prompts_checked": len(rows), "max_logprob_abs_diff": lp_diff if compared else None,
        "load_seconds": _round(reply.get("load_seconds")), "generate_seconds": _round(seconds),
        "wall_seconds": _round(reply.get("wall_seconds")), "new_tokens": reply.get("new_tokens"),
        "tokens_per_s": _round(reply.get("tokens_per_s")), "batched": reply.get("batched"), "rows": rows,
    }
    return check, details


def _round(x, nd: int = 3):
    return round(float(x), nd) if isinstance(x, (int, float)) and math.isfinite(x) else None
