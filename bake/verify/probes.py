"""Inputs that verification runs through the hooked and the baked model.

Three kinds of probe, all deterministic (fixed seed):

* ``prompt``  -- built-in natural-language prompts, one per probe (only when
  the model has a tokenizer);
* ``random``  -- random token ids at several lengths, batch of 2, which reach
  embedding rows and positions that prompts never touch;
* ``padded``  -- one batch of different-length sequences, right-padded with an
  attention mask, so the mask path (and any fold that must ignore padding) is
  exercised.  Right padding keeps every query row attending to at least one
  real token, so no fully-masked softmax rows produce NaN.

Only positions with ``attention_mask == 1`` are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "I watched the movie last night and honestly I thought it was",
    "Water boils at 100 degrees Celsius because",
)
GREEDY_PROMPTS = PROMPTS[:3]
RANDOM_LENGTHS = (1, 7, 33)
PADDED_LENGTHS = (5, 19, 12)
SEED = 1234


@dataclass(frozen=True)
class Probe:
    name: str
    kind: str  # "prompt" | "random" | "padded"
    input_ids: torch.Tensor  # [B, L] int64, cpu
    attention_mask: torch.Tensor  # [B, L] int64, cpu


def _text_config(model):
    """The config that sizes the text input: a vision-language model's text config, else the model's own."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_vocab_size(model) -> int:
    cfg = _text_config(model)
    n = getattr(cfg, "vocab_size", None)
    if isinstance(n, int) and n > 0:
        return n
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[0])


def model_max_length(model, default: int = 512) -> int:
    cfg = _text_config(model)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def random_ids(batch: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    # Skip the first ids (usually special tokens: pad/bos/eos) when the vocab allows.
    low = 3 if vocab > 8 else 0
    return torch.randint(low, vocab, (batch, length), generator=gen)


def encode_prompt(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids.to(torch.int64)


def _pad_right(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return ids, mask


def pad_id_for(tokenizer, vocab: int) -> int:
    pid = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return int(pid) if isinstance(pid, int) and 0 <= pid < vocab else 0


def build_probes(model, tokenizer=None, *, seed: int = SEED) -> list[Probe]:
    """The probe set for ``model``; the prompt batch only when a tokenizer is given.

    Few, batched forward passes: verification runs them through the reference and
    every candidate, and on a CPU each pass over a real model's weights costs seconds.
    """
    vocab = model_vocab_size(model)
    max_len = model_max_length(model)
    gen = torch.Generator().manual_seed(seed)
    probes: list[Probe] = []
    if tokenizer is not None:
        rows = [encode_prompt(tokenizer, text)[:max_len] for text in PROMPTS]
        rows = [r[r < vocab] for r in rows]  # a tokenizer larger than the embedding would index out of range
        rows = [r for r in rows if r.numel()]
        if rows:
            ids, mask = _pad_right(rows, pad_id_for(tokenizer, vocab))
            probes.append(Probe("prompts", "prompt", ids, mask))
    for length in RANDOM_LENGTHS:
        length = min(length, max_len)
        ids = random_ids(2, length, vocab, gen)
        probes.append(Probe(f"random-len{length}", "random", ids, torch.ones_like(ids)))
    rows = [random_ids(1, min(n, max_len), vocab, gen)[0] for n in PADDED_LENGTHS]
    ids, mask = _pad_right(rows, pad_id_for(tokenizer, vocab))
    probes.append(Probe("padded-random", "padded", ids, mask))
    return probes


def build_greedy_prompts(model, tokenizer=None, *, seed: int = SEED) -> torch.Tensor:
    """``[P, L]`` prompts of one length (so greedy decoding runs as one unpadded batch):
    the built-in texts cut to the shortest, or random ids without a tokenizer."""
    vocab = model_vocab_size(model)
    if tokenizer is not None:
        rows = [encode_prompt(tokenizer, t) for t in GREEDY_PROMPTS]
        rows = [r[r < vocab] for r in rows]
        n = min(r.numel() for r in rows)
        if n >= 2:
            return torch.stack([r[:n] for r in rows])
    gen = torch.Generator().manual_seed(seed + 1)
    return random_ids(len(GREEDY_PROMPTS), 6, vocab, gen)
