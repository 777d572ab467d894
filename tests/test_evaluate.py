"""Fast unit tests of lineas.evaluate on a tiny random llama with a character tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_model

from lineas import evaluate as E
from lineas.hooks import attach_affine, steered
from lineas.maps import SiteMap, SteeringMaps
from lineas.prompts import builtin_names, load_prompts

PROMPTS = ["The cat", "A dog sat on", "Hi", "Once upon a time there"]


def char_tokenizer():
    """A character-level fast tokenizer that fits the tiny models' 128-token vocab (no network)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]  # printable ASCII: ids 3..97
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    # No pad token, like SmolLM2's GGUF tokenizer: the harness must fall back to eos.
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    m.generation_config.eos_token_id = 1
    return m


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_prompt_sets_are_builtin_and_disjoint():
    for name in ("negative", "positive", "neutral", "fantasy", "neutral_prompts"):
        assert name in builtin_names()
    neg, pos = load_prompts("negative").texts, load_prompts("positive").texts
    assert len(neg) == len(pos) >= 64  # line-by-line pairs
    assert len(load_prompts("neutral")) >= 64 and len(load_prompts("fantasy")) >= 64
    figure, held = E.load_eval_prompts("figure"), E.load_eval_prompts("heldout")
    assert len(figure) == 16 and len(held) >= 32 and not set(figure) & set(held)
    train = [t.lower() for n in ("negative", "positive", "neutral", "fantasy") for t in load_prompts(n).texts]
    for p in figure + held:  # no evaluation prompt starts a training sentence
        assert not any(t.startswith(p.lower().rstrip(",")) for t in train), p
    with pytest.raises(E.EvaluationError, match="bogus"):
        E.load_eval_prompts("bogus")


def test_left_pad():
    b = E.left_pad([[5, 6, 7], [8]], pad_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_falls_back_to_eos(tok):
    assert tok.pad_token is None
    assert E.pad_token_id(tok) == 1


def test_batched_left_padded_generation_matches_one_by_one(model, tok):
    batched = E.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4, fixed_length=True)
    single = E.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=1, fixed_length=True)
    assert all(len(t) == 8 for t in batched.token_ids)
    assert E.compare_tokens(single, batched).identical
    assert batched.prompt_ids[0] == tuple(tok("The cat", add_special_tokens=False)["input_ids"])
    assert batched.new_tokens == 32 and batched.tokens_per_second > 0


def test_generation_stops_at_eos(tok):
    m = tiny_model("llama", seed=1)
    m.generation_config.eos_token_id = 1

    calls = []

    def eos_after_two(module, inputs, logits):  # one lm_head call per new token; the 3rd is eos
        calls.append(1)
        if len(calls) >= 3:
            logits = logits.clone()
            logits[..., 1] += 1e4
        return logits

    h = m.lm_head.register_forward_hook(eos_after_two)
    try:
        g = E.generate(m, tok, ["abc"], max_new_tokens=8)
    finally:
        h.remove()
    assert len(g.token_ids[0]) == 3 and g.token_ids[0][-1] == 1
    assert g.texts[0] == tok.decode(g.token_ids[0][:2], skip_special_tokens=True)  # eos dropped from the text


def test_steering_changes_generation_and_comparison_reports_it(model, tok):
    base = E.generate(model, tok, PROMPTS, max_new_tokens=8, fixed_length=True)
    site = "model.layers.0.post_attention_layernorm"
    shift = torch.randn(64, generator=torch.Generator().manual_seed(0))
    h = attach_affine(model, {site: (torch.full((64,), 3.0), shift)})
    try:
        hooked = E.generate(model, tok, PROMPTS, max_new_tokens=8, fixed_length=True)
    finally:
        h.remove()
    cmp = E.compare_tokens(base, hooked)
    assert not cmp.identical and cmp.first_mismatch is not None
    i, k = cmp.first_mismatch
    assert base.token_ids[i][:k] == hooked.token_ids[i][:k] and base.token_ids[i][k] != hooked.token_ids[i][k]
    again = E.generate(model, tok, PROMPTS, max_new_tokens=8, fixed_length=True)
    assert E.compare_tokens(base, again).identical  # hooks removed -> base again


def test_continuation_perplexity_matches_direct_computation(model, tok):
    g = E.generate(model, tok, PROMPTS[:2], max_new_tokens=5, fixed_length=True)
    ppl = E.continuation_perplexity(model, g, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, c in zip(g.prompt_ids, g.token_ids):
            ids = torch.tensor([list(p + c)])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            for j in range(len(p), len(p) + len(c)):
                nll -= float(logp[j - 1, ids[0, j]])
                n += 1
    assert n == 10
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    # Greedy continuations are the model's own argmax picks: likelier than uniform.
    assert ppl < 128


def test_text_perplexity_reacts_to_steering(model, tok):
    base = E.text_perplexity(model, tok, "the quick brown fox jumps over the lazy dog")
    maps = SteeringMaps({"model.layers.1.input_layernorm": SiteMap(torch.full((64,), 4.0), torch.full((64,), 2.0))})
    with steered(model, maps, 1.0):
        hooked = E.text_perplexity(model, tok, "the quick brown fox jumps over the lazy dog")
    assert math.isfinite(base) and math.isfinite(hooked) and hooked != pytest.approx(base)
    with pytest.raises(E.EvaluationError, match="two tokens"):
        E.text_perplexity(model, tok, "a")


def test_sentiment_scores():
    s = E.sentiment(["I love this wonderful, beautiful day.", "This is terrible and I hate it.", "The bus is red."])
    assert s.scores[0] > 0.5 and s.scores[1] < -0.5 and abs(s.scores[2]) <= 0.05
    assert s.positive_rate == pytest.approx(1 / 3)
    assert s.mean_compound == pytest.approx(sum(s.scores) / 3)
    with pytest.raises(E.EvaluationError):
        E.sentiment([])


def test_bad_inputs(model, tok):
    with pytest.raises(E.EvaluationError, match="no prompts"):
        E.generate(model, tok, [], max_new_tokens=4)
    with pytest.raises(E.EvaluationError, match="max_new_tokens"):
        E.generate(model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(E.EvaluationError, match="tokenizer"):
        E.generate(model, None, PROMPTS)
    a = E.generate(model, tok, PROMPTS[:2], max_new_tokens=2, fixed_length=True)
    b = E.generate(model, tok, PROMPTS[1:3], max_new_tokens=2, fixed_length=True)
    with pytest.raises(E.EvaluationError, match="different prompts"):
        E.compare_tokens(a, b)


def test_benchmark_interleaves_and_keeps_best(model, tok):
    calls = []

    def runner(name):
        def run():
            calls.append(name)
            return E.generate(model, tok, PROMPTS[:2], max_new_tokens=3, fixed_length=True)
        return run

    res = E.benchmark({"base": runner("base"), "hooked": runner("hooked")}, repeats=2)
    assert calls == ["base", "hooked", "base", "hooked"]
    assert res["base"].new_tokens == 6
    assert res["base"].tokens_per_second == max(res["base"].all_tokens_per_second)


# -- the demo's bookkeeping (no model needed) ------------------------------------------------------
def _cond(method, strength, mean, pos, ppl, txt=20.0):
    return {"method": method, "strength": strength, "fluency_text_ppl": txt,
            "heldout": {"n": 36, "mean_compound": mean, "positive_rate": pos, "generation_ppl": ppl},
            "figure": {"n": 16, "mean_compound": mean, "positive_rate": pos},
            "samples": [{"prompt": "The movie was", "continuation": "a | b\nc", "compound": mean}]}


def test_demo_expectations_are_measured_not_assumed():
    from lineas.demo.pipeline import expectations

    conds = [_cond("unsteered", 0.0, 0.3, 0.5, 3.0), _cond("LinEAS", 0.5, 0.5, 0.7, 3.1),
             _cond("LinEAS", 1.0, 0.75, 0.92, 3.3)]
    rt = {"prompts": ["a"] * 8, "comparisons_vs_hooked": {
        "base": {"identical": False}, "baked (transformers)": {"identical": True, "n_identical": 8, "n_prompts": 8},
        "baked (ONNX Runtime)": {"identical": False, "error": "boom"}}}
    got = {e["name"]: e["met"] for e in expectations(conds, {"affine_modules": 0}, rt)}
    assert got["LinEAS λ=1 raises mean VADER compound"] and got["LinEAS λ=1 positive rate"]
    assert got["LinEAS λ=1 generation perplexity increase"] is True  # +10%
    assert got["baked (transformers) greedy tokens == hooked"]
    assert not got["baked (ONNX Runtime) greedy tokens == hooked"]
    conds[2] = _cond("LinEAS", 1.0, 0.75, 0.85, 3.6)  # 85% positive, +20% perplexity
    got = {e["name"]: e["met"] for e in expectations(conds, {"affine_modules": 2}, None)}
    assert not got["LinEAS λ=1 positive rate"] and not got["LinEAS λ=1 generation perplexity increase"]
    assert not got["baked with zero affine modules"]


def test_demo_summary_tables_escape_cells():
    from lineas.demo.report import metrics_table, samples_table

    conds = [_cond("unsteered", 0.0, 0.3, 0.5, 3.0), _cond("LinEAS", 1.0, 0.75, 0.92, 3.3, 22.0)]
    rows = metrics_table(conds)
    assert "+10%" in rows[3] and "92%" in rows[3] and "22.0 (+10%)" in rows[3]
    sample = samples_table(conds)[2]
    assert "a \\| b c" in sample and "\n" not in sample


def test_demo_rejects_bad_arguments(capsys):
    from lineas.demo.__main__ import main

    assert main(["--methods", "lineas,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["--n-eval", "999"]) == 2
    assert main(["--maps", "lineas=/nonexistent.safetensors"]) == 2
