"""The forward passes of verification: a model (or an ONNX session) as an ids -> logits runner, probe
batches packed into few passes, greedy decoding.

A model whose weights are read from disk as it runs (:func:`bake.checkpoint.load_bounded`) pays that
read once per pass, so batches share passes; the logits of a large vocabulary bound how many
positions one pass may carry (:data:`LOGITS_BUDGET`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lineas.evaluate import model_logits

from .checkpoint import trim_heap

# A candidate is anything mapping (input_ids, attention_mask) -> logits [B, L, V];
# torch models are wrapped by :func:`torch_runner`; ONNX exporters pass their own.
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def torch_runner(model: nn.Module) -> Runner:
    """A torch model as a :data:`Runner` (logits on the CPU, for comparing with the reference)."""
    offloaded = "disk" in (getattr(model, "hf_device_map", None) or {}).values()

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model_logits(model, input_ids, attention_mask).detach().to("cpu", torch.float32)
        if offloaded:  # each pass allocated and freed every offloaded block: hand the pages back at once
            trim_heap()
        return out

    return run


def run_batches(run: Runner, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Several ``(input_ids, attention_mask)`` batches in ONE forward pass, right-padded to the longest
    (padding is masked and never compared; causal models give every real position the same inputs as
    alone).  A model whose weights are read from disk as it runs pays that read once, not per batch."""
    width = max(ids.shape[1] for ids, _ in batches)
    ids = torch.cat([F.pad(i.to(torch.int64), (0, width - i.shape[1])) for i, _ in batches])
    mask = torch.cat([F.pad(m.to(torch.int64), (0, width - m.shape[1])) for _, m in batches])
    out = run(ids, mask)
    rows = torch.tensor([0] + [i.shape[0] for i, _ in batches]).cumsum(0).tolist()
    return [out[a:b, :i.shape[1]] for a, b, (i, _) in zip(rows, rows[1:], batches)]


LOGITS_BUDGET = 256 << 20  # bytes of float32 logits per forward pass (a 256k vocabulary: ~260 positions)


def _groups(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], vocab: int, first: int) -> list[list[int]]:
    """Batch indices packed into as few forward passes as keep each pass's padded logits under
    :data:`LOGITS_BUDGET`, widest first."""
    cap = max(1, LOGITS_BUDGET // (4 * max(1, vocab)))
    # Widest first (padding wastes least); ``first`` leads its width class so that it opens the first pass.
    order = sorted(range(len(batches)), key=lambda i: (-batches[i][0].shape[1], i != first))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1] + [i]
            width = max(batches[j][0].shape[1] for j in g)
            if sum(batches[j][0].shape[0] for j in g) * width <= cap:
                groups[-1] = g
                continue
        groups.append([i])
    return groups


def run_grouped(run: Runner, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], vocab: int, *,
                first: int = 0, record=None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Logits of every batch, in as few passes as :func:`_groups` allows.  ``record``: a context manager
    factory (:func:`record_outputs`) active during the pass that holds batch ``first``; returns that
    batch's rows of what it recorded."""
    outs: list[torch.Tensor | None] = [None] * len(batches)
    acts: dict[str, torch.Tensor] = {}
    for idxs in _groups(batches, vocab, first):
        sub = [batches[i] for i in idxs]
        if first in idxs and record is not None:
            with record() as store:
                res = run_batches(run, sub)
            start = sum(batches[i][0].shape[0] for i in idxs[:idxs.index(first)])
            rows, length = batches[first][0].shape
            total = sum(b[0].shape[0] for b in sub)
            acts = {k: (v[start:start + rows, :length].clone() if v.dim() >= 2 and v.shape[0] == total else v)
                    for k, v in store.items()}
        else:
            res = run_batches(run, sub)
        for i, r in zip(idxs, res):
            outs[i] = r
    return outs, acts


def greedy_tokens(run: Runner, prompts: torch.Tensor, n_new: int) -> list[list[int]]:
    """Greedy continuation of each row of ``prompts`` ``[P, L]`` (one batch, no padding, no KV cache),
    for the reference; candidates are teacher-forced on its tokens (see :func:`_run_all`)."""
    ids = prompts.to(torch.int64)
    for _ in range(n_new):
        logits = run(ids, torch.ones_like(ids))[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:].tolist()
