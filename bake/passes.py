"""The forward passes of verification: a model (or an ONNX session) as an ids -> logits runner, probe
batches packed into few passes, greedy decoding.

A model whose weights are read from disk as it runs (:func:`bake.checkpoint.load_bounded`) pays that
read once per pass, so batches share passes; the logits of a large vocabulary bound how many
positions one pass may carry (:data:`LOGITS_BUDGET`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lineas.evaluate import model_logits

from .rawmem import trim_heap

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


Shape = tuple[int, int]  # (rows, width) of a batch


def position_cap(vocab: int, budget: int | None = None) -> int:
    """Padded positions one pass may carry: ``budget`` bytes (None: :data:`LOGITS_BUDGET`) of float32
    logits over ``vocab``."""
    return max(1, (LOGITS_BUDGET if budget is None else budget) // (4 * max(1, vocab)))


def pack_passes(units: Sequence[Shape], cap: int, fixed: Sequence[Shape] = (),
                not_before: Sequence[int | None] | None = None) -> list[list[int]]:
    """Batches (``units``, by shape) assigned to forward passes, in the order the passes run.

    A pass right-pads its rows to its widest batch, so it costs rows x width positions.  The first
    ``len(fixed)`` passes already carry one batch each (the greedy decoding steps, which must run
    one after the other); the units ride along.  Widest first, each unit goes where it adds the fewest
    padded positions while its pass stays within ``cap``; a pass is added only when no pass can take
    it (a unit larger than ``cap`` gets one of its own).  Opening the extra passes up front can save
    one (the wide units then do not fill the fixed passes), so each count of them is tried: the fewest
    passes win, then the fewest positions.  ``not_before[i]``: a unit placed earlier (the same shape,
    listed before ``i``) whose pass unit ``i``'s should not precede, when a pass that fits allows (the
    hooked logits of a probe then exist when its perturbed ones arrive).
    Returns, per pass, the indices of the units it carries."""
    def positions(members: list[list[int]]) -> int:
        shapes = [[fixed[k]] if k < len(fixed) else [] for k in range(len(members))]
        for k, m in enumerate(members):
            shapes[k] += [units[i] for i in m]
        return sum(sum(r for r, _ in sh) * max(w for _, w in sh) for sh in shapes if sh)

    best = _place(units, cap, fixed, not_before, opened=0)
    for opened in range(1, len(best) - len(fixed)):
        other = _place(units, cap, fixed, not_before, opened=opened)
        if (len(other), positions(other)) < (len(best), positions(best)):
            best = other
    return best


def _place(units: Sequence[Shape], cap: int, fixed: Sequence[Shape], not_before: Sequence[int | None] | None,
           opened: int) -> list[list[int]]:
    """:func:`pack_passes` with ``opened`` empty passes after the fixed ones from the start."""
    rows, width = [r for r, _ in fixed] + [0] * opened, [w for _, w in fixed] + [0] * opened
    members: list[list[int]] = [[] for _ in rows]
    where: dict[int, int] = {}
    for i in sorted(range(len(units)), key=lambda i: (-units[i][1], -units[i][0], i)):
        r, w = units[i]

        def added(p: int) -> int:
            return (rows[p] + r) * max(width[p], w) - rows[p] * width[p]

        fits = [p for p in range(len(members)) if (rows[p] + r) * max(width[p], w) <= cap]
        after = where.get(not_before[i]) if not_before is not None and not_before[i] is not None else None
        fits = [p for p in fits if after is None or p >= after] or fits
        if fits:
            p = min(fits, key=lambda p: (added(p), p))
        else:
            p = len(members)
            rows.append(0)
            width.append(0)
            members.append([])
        rows[p], width[p] = rows[p] + r, max(width[p], w)
        members[p].append(i)
        where[i] = p
    return [m for k, m in enumerate(members) if m or k < len(fixed)]


@dataclass(frozen=True)
class RowSlice:
    """Where one batch sits in a pass: rows ``start:stop`` of ``total``, its first ``length`` positions."""

    start: int
    stop: int
    length: int
    total: int

    def take(self, y: torch.Tensor) -> torch.Tensor:
        """The batch's part of a module output of the whole pass (outputs that are not ``[total, L, ...]``
        are the pass's, whole)."""
        return y[self.start:self.stop, :self.length] if y.dim() >= 2 and y.shape[0] == self.total else y


def row_slice(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], index: int) -> RowSlice:
    """Batch ``index`` of ``batches`` run together by :func:`run_batches`."""
    start = sum(b[0].shape[0] for b in batches[:index])
    rows, length = batches[index][0].shape
    return RowSlice(start=start, stop=start + rows, length=length, total=sum(b[0].shape[0] for b in batches))


def run_grouped(run: Runner, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], vocab: int, *,
                first: int = 0, record=None, budget: int | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Logits of every batch, in as few passes as :func:`pack_passes` allows.  ``record``: a context
    manager factory taking a :class:`RowSlice` (:func:`bake.verify.record_outputs`), active during the
    pass that holds batch ``first``; returns what it recorded of that batch's rows."""
    outs: list[torch.Tensor | None] = [None] * len(batches)
    acts: dict[str, torch.Tensor] = {}
    for idxs in pack_passes([tuple(ids.shape) for ids, _ in batches], position_cap(vocab, budget)):
        sub = [batches[i] for i in idxs]
        if first in idxs and record is not None:
            with record(row_slice(sub, idxs.index(first))) as acts:
                res = run_batches(run, sub)
        else:
            res = run_batches(run, sub)
        for i, r in zip(idxs, res):
            outs[i] = r.clone()  # compact: the pass's padded logits (a 256k vocabulary: ~1 MB a position) go now
        del res
    return outs, acts


def greedy_tokens(run: Runner, prompts: torch.Tensor, n_new: int) -> list[list[int]]:
    """Greedy continuation of each row of ``prompts`` ``[P, L]`` (one batch, no padding, no KV cache),
    for the reference; candidates are teacher-forced on its tokens (see :func:`_run_all`)."""
    ids = prompts.to(torch.int64)
    for _ in range(n_new):
        logits = run(ids, torch.ones_like(ids))[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:].tolist()
