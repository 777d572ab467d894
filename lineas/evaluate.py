"""Evaluation harness for steered causal LMs: generation, sentiment, fluency, speed.

Conventions (the README figures use them; keep them stable):

* **Prompts** are raw sentence starts ("The movie was") continued as plain
  text -- no chat template.  They are tokenised *without* special tokens: the
  GGUF build of SmolLM2 prepends ``<|im_start|>`` as BOS, which makes the
  model treat the prompt as a chat role header, whereas the original HF
  tokenizer adds nothing.  ``add_special_tokens=True`` restores the BOS.
* **Generation** is greedy and batched with LEFT padding, so every row's last
  prompt token sits at the same position.  The pad id is the tokenizer's pad
  token, or its eos token when it has none (SmolLM2's GGUF tokenizer has no
  pad token; :func:`lineas.models.load_tokenizer` sets pad = eos).  Padded
  positions are masked, so the pad id never influences the output.
  Generation stops at the model's eos ids (generation config + tokenizer);
  ``fixed_length=True`` disables stopping so every row has exactly
  ``max_new_tokens`` tokens (used for token-by-token comparisons and timing).
* **Sentiment**: VADER compound score (``vaderSentiment``, offline, rule based)
  of the *continuation only*; "positive" means compound > 0.05 (VADER's own
  threshold).
* **Fluency**: (a) perplexity of the generated continuations under the
  *unsteered* model, conditioned on their prompts (does the steered model still
  write text the base model finds likely?), and (b) perplexity of the fixed
  neutral paragraph :data:`FLUENCY_TEXT` under the *steered* model (did
  steering damage language modelling?).  Both are token-weighted:
  ``exp(sum NLL / number of scored tokens)``.
* **Speed**: generated tokens per second of fixed-length greedy generation,
  best of several interleaved repetitions (:func:`benchmark`), so models
  measured in the same run see the same CPU contention.

Works with any model that has a HF-style ``generate`` and ``__call__``
returning ``.logits`` (transformers models, ONNX Runtime ``ORTModelForCausalLM``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
PROMPTS_FILE = DATA_DIR / "neutral_prompts.txt"
N_FIGURE_PROMPTS = 16  # lines 1..16 of neutral_prompts.txt; the rest is held out
POSITIVE_THRESHOLD = 0.05  # VADER's conventional cut-off for "positive"

# A fixed neutral paragraph (written for this project) whose perplexity under
# the steered model measures damage to plain language modelling.
FLUENCY_TEXT = (
    "The town library opens at nine in the morning and closes at six in the evening. "
    "On the ground floor there is a reading room with long wooden tables, a row of computers "
    "and a desk where visitors can ask for help. The second floor holds the history and science "
    "collections, and a small room at the back is used for meetings and language classes. "
    "Books can be borrowed for three weeks and renewed twice, either at the desk or online. "
    "Every Saturday morning a volunteer reads stories to young children, and once a month the "
    "library shows an old film in the meeting room. The building was built in 1962 and was "
    "renovated ten years ago, when the heating system and the windows were replaced."
)


class EvaluationError(ValueError):
    """Bad input to the harness (empty prompt list, missing tokenizer, ...)."""


# -- prompts ------------------------------------------------------------------
def load_eval_prompts(split: str = "heldout") -> list[str]:
    """Neutral evaluation prompts: ``figure`` (first 16), ``heldout`` (the rest) or ``all``."""
    lines = [ln.strip() for ln in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if split == "figure":
        return lines[:N_FIGURE_PROMPTS]
    if split == "heldout":
        return lines[N_FIGURE_PROMPTS:]
    if split == "all":
        return lines
    raise EvaluationError(f"unknown prompt split {split!r}; choose figure, heldout or all")


# -- generation ---------------------------------------------------------------
@dataclass(frozen=True)
class Generations:
    """Greedy continuations of ``prompts`` (one row per prompt)."""

    prompts: tuple[str, ...]
    texts: tuple[str, ...]  # decoded continuations, special tokens removed
    token_ids: tuple[tuple[int, ...], ...]  # continuation ids, cut after the first eos
    prompt_ids: tuple[tuple[int, ...], ...]  # prompt ids as the model saw them (unpadded)
    seconds: float  # wall time of the generate calls

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def stop_token_ids(model, tokenizer) -> list[int]:
    """Eos ids from the model's generation config and the tokenizer (deduplicated)."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    for v in ([eos] if isinstance(eos, int) else list(eos or [])) + [getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EvaluationError("the tokenizer has neither a pad nor an eos token; cannot pad a batch")
    return int(pad)


def encode_prompts(tokenizer, prompts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
    if tokenizer is None:
        raise EvaluationError("generation from text prompts needs a tokenizer")
    if not prompts:
        raise EvaluationError("no prompts to generate from")
    rows = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    for p, r in zip(prompts, rows):
        if not r:
            raise EvaluationError(f"prompt {p!r} tokenises to zero tokens")
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (pad positions masked)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _cut_after_stop(ids: Sequence[int], stops: Sequence[int]) -> tuple[int, ...]:
    out = []
    for t in ids:
        out.append(int(t))
        if t in stops:
            break
    return tuple(out)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 40, batch_size: int = 16,
             fixed_length: bool = False, add_special_tokens: bool = False) -> Generations:
    """Greedy, batched, left-padded continuations of ``prompts``."""
    if max_new_tokens < 1:
        raise EvaluationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = encode_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)
    pad = pad_token_id(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                  num_beams=1, temperature=None, top_p=None, top_k=None)
    if fixed_length:
        kwargs.update(min_new_tokens=max_new_tokens, eos_token_id=None)
    else:
        kwargs.update(eos_token_id=stops or None)
    conts: list[tuple[int, ...]] = []
    seconds = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = left_pad(chunk, pad)
        t0 = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        seconds += time.perf_counter() - t0
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        conts.extend(tuple(int(t) for t in r) if fixed_length else _cut_after_stop(r, stops) for r in new)
    texts = tuple(tokenizer.decode(c, skip_special_tokens=True) for c in conts)
    return Generations(tuple(prompts), texts, tuple(conts), tuple(tuple(r) for r in rows), seconds)


# -- sentiment ----------------------------------------------------------------
@dataclass(frozen=True)
class SentimentStats:
    mean_compound: float
    positive_rate: float  # fraction with compound > POSITIVE_THRESHOLD
    scores: tuple[float, ...]


_VADER = None


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER compound score in [-1, 1] per text (offline, deterministic)."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise EvaluationError("sentiment scoring needs vaderSentiment: pip install 'lineas-bake[demo]'") from None
        _VADER = SentimentIntensityAnalyzer()
    return [float(_VADER.polarity_scores(t)["compound"]) for t in texts]


def sentiment(texts: Sequence[str]) -> SentimentStats:
    if not texts:
        raise EvaluationError("no texts to score")
    scores = vader_compound(texts)
    return SentimentStats(sum(scores) / len(scores), sum(s > POSITIVE_THRESHOLD for s in scores) / len(scores),
                          tuple(scores))


# -- fluency ------------------------------------------------------------------
@torch.no_grad()
def input_device(model) -> torch.device:
    """Where a model's inputs go: its first parameter's device; the CPU for a model dispatched by
    accelerate with offloaded weights (its hooks move inputs to each layer's execution device)."""
    param = next(model.parameters(), None)
    if param is None or (param.device.type == "meta" and getattr(model, "hf_device_map", None)):
        return torch.device("cpu")
    return param.device


@torch.no_grad()
def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The one ids -> logits runner (fluency here, bake verification too): float32 ``[B, L, V]``
    on the model's device, inputs moved there, no KV cache.  Without gradients: a graph would keep
    every weight of the pass alive, and an offloaded model would then hold all of its layers at once."""
    device = input_device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    out = model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def sequence_nll(model, rows: Sequence[Sequence[int]], score_from: Sequence[int], *, pad_id: int = 0,
                 batch_size: int = 16) -> tuple[float, int]:
    """Summed next-token NLL of ``row[score_from[i]:]`` given the row's prefix, and the token count.

    Rows are right-padded (real tokens keep positions 0..n-1, as unpadded).
    """
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk, froms = rows[start:start + batch_size], score_from[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target_mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, (r, f) in enumerate(zip(chunk, froms)):
            ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, :len(r)] = 1
            target_mask[i, max(f, 1):len(r)] = True  # token 0 has no context to be predicted from
        logp = torch.log_softmax(model_logits(model, ids, mask)[:, :-1].cpu(), dim=-1)
        tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        sel = target_mask[:, 1:]
        total += float(-tok_logp[sel].sum())
        count += int(sel.sum())
    return total, count


def continuation_perplexity(model, gens: Generations, *, batch_size: int = 16, pad_id: int = 0) -> float:
    """Perplexity of ``gens``' continuations (given their prompts) under ``model``."""
    rows = [p + c for p, c in zip(gens.prompt_ids, gens.token_ids) if c]
    froms = [len(p) for p, c in zip(gens.prompt_ids, gens.token_ids) if c]
    if not rows:
        raise EvaluationError("all continuations are empty; nothing to score")
    nll, n = sequence_nll(model, rows, froms, pad_id=pad_id, batch_size=batch_size)
    return math.exp(nll / n)


def text_perplexity(model, tokenizer, text: str = FLUENCY_TEXT) -> float:
    """Perplexity of one text under ``model`` (all tokens after the first are scored)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise EvaluationError("the fluency text must have at least two tokens")
    nll, n = sequence_nll(model, [ids], [1])
    return math.exp(nll / n)


# -- comparisons & speed ---------------------------------------------------------
@dataclass(frozen=True)
class TokenComparison:
    n_prompts: int
    n_identical: int
    first_mismatch: tuple[int, int] | None  # (prompt index, token index) of the first difference

    @property
    def identical(self) -> bool:
        return self.n_identical == self.n_prompts


def compare_tokens(reference: Generations, other: Generations) -> TokenComparison:
    """Row-by-row token equality of two generation runs over the same prompts."""
    if reference.prompts != other.prompts:
        raise EvaluationError("the two generation runs used different prompts")
    same, first = 0, None
    for i, (a, b) in enumerate(zip(reference.token_ids, other.token_ids)):
        if a == b:
            same += 1
        elif first is None:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first = (i, k)
    return TokenComparison(len(reference.token_ids), same, first)


@dataclass(frozen=True)
class SpeedResult:
    name: str
    tokens_per_second: float  # best repetition
    all_tokens_per_second: tuple[float, ...]
    new_tokens: int  # per repetition


def benchmark(runners: Mapping[str, Callable[[], Generations]], repeats: int = 3) -> dict[str, SpeedResult]:
    """Run each generation callable ``repeats`` times, interleaved; keep the best tokens/s.

    Interleaving (a b c a b c ...) exposes every model to the same background
    load; the best repetition is the least disturbed one.
    """
    if repeats < 1:
        raise EvaluationError(f"repeats must be >= 1, got {repeats}")
    rates: dict[str, list[float]] = {name: [] for name in runners}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in runners.items():
            g = run()
            rates[name].append(g.tokens_per_second)
            counts[name] = g.new_tokens
    return {name: SpeedResult(name, max(r), tuple(r), counts[name]) for name, r in rates.items()}
