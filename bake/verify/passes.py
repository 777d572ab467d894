"""The forward passes of verification: a model (or an ONNX session) as an ids -> logits runner, probe
batches packed into few passes, greedy decoding.

A model whose weights are read from disk as it runs (:func:`bake.store.checkpoint.load_bounded`) pays that
read once per pass, so batches share passes; the logits of a large vocabulary bound how many
positions one pass may carry (:data:`LOGITS_BUDGET`).  Of the positions a pass computes, only those whose
logits are compared go through the output head (:class:`TorchRunner`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bake.store.rawmem import trim_heap
from lineas.evaluate import model_logits

# A candidate is anything mapping (input_ids, attention_mask) -> logits [B, L, V];
# torch models are wrapped by :func:`torch_runner`; ONNX exporters pass their own.
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TorchRunner:
    """A torch model as a :data:`Runner` (logits on the CPU, for comparing with the reference).

    ``keep`` (bool ``[B, L]``): the positions whose logits are wanted; the output head then runs on those
    positions only (a forward pre-hook hands it just their hidden states, and the model's own code after
    it, e.g. Gemma-2's logit soft-capping, runs on them as on any others) and the other positions come
    back as zeros.  The head is a quarter of a Gemma-2-2B position's arithmetic, and a verification wants
    the logits of fewer than half of the positions it computes (the last of each greedy step, none of the
    padding).  ``keep_layout``: modules whose outputs hooks read or steer per row of the pass (the steered
    sites, the watched blocks): the head is never narrowed when it is one of them."""

    def __init__(self, model: nn.Module, keep_layout: Collection[str] = ()):
        self.model = model
        self.offloaded = "disk" in (getattr(model, "hf_device_map", None) or {}).values()
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        self.head = head if name is not None and name not in set(keep_layout) else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        narrowed: list[bool] = []
        with _narrowed_head(self.head, keep, narrowed):
            out = model_logits(self.model, input_ids, attention_mask).detach().to("cpu", torch.float32)
        if narrowed:
            full = out.new_zeros(*keep.shape, out.shape[-1])
            full[keep] = out.reshape(-1, out.shape[-1])
            out = full
        if self.offloaded:  # each pass allocated and freed every offloaded block: hand the pages back at once
            trim_heap()
        return out


def torch_runner(model: nn.Module, keep_layout: Collection[str] = ()) -> TorchRunner:
    """``model`` as a :data:`Runner` (see :class:`TorchRunner`)."""
    return TorchRunner(model, keep_layout)


@contextmanager
def _narrowed_head(head: nn.Module | None, keep: torch.Tensor | None, narrowed: list[bool]):
    """While active, ``head`` runs on the ``keep`` positions of its ``[B, L, H]`` input only (as one row
    ``[1, n, H]``), and ``narrowed`` says whether it did; an input of another shape runs whole."""
    if head is None or keep is None:
        yield
        return

    def narrow(_module, args):
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(keep.shape):
            return None
        narrowed.append(True)
        return (hidden[keep.to(hidden.device)].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(narrow, prepend=True)  # before any hook that looks at its input
    try:
        yield
    finally:
        handle.remove()


def run_batches(run: Runner, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                keeps: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Several ``(input_ids, attention_mask)`` batches in ONE forward pass, right-padded to the longest
    (padding is masked and never compared; causal models give every real position the same inputs as
    alone).  A model whose weights are read from disk as it runs pays that read once, not per batch.

    ``keeps``: per batch, the positions whose logits are wanted (bool ``[rows, L]``; None: its attention
    mask, every real position).  The others come back as zeros, whatever the runner: a
    :class:`TorchRunner` does not compute them at all."""
    width = max(ids.shape[1] for ids, _ in batches)
    ids = torch.cat([F.pad(i.to(torch.int64), (0, width - i.shape[1])) for i, _ in batches])
    mask = torch.cat([F.pad(m.to(torch.int64), (0, width - m.shape[1])) for _, m in batches])
    keeps = keeps or [None] * len(batches)
    keep = torch.cat([F.pad((m if k is None else k).bool(), (0, width - m.shape[1]))
                      for (_, m), k in zip(batches, keeps, strict=True)])
    if isinstance(run, TorchRunner):
        out = run(ids, mask, keep=keep)
    else:
        out = run(ids, mask).masked_fill(~keep[..., None], 0.0)
    rows = torch.tensor([0] + [i.shape[0] for i, _ in batches]).cumsum(0).tolist()
    return [out[a:b, :i.shape[1]] for a, b, (i, _) in zip(rows, rows[1:], batches)]


def last_position(ids: torch.Tensor) -> torch.Tensor:
    """A ``keep`` (:func:`run_batches`) of the last position of every row of ``ids``: a greedy step."""
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    keep[:, -1] = True
    return keep


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

        def added(p: int, r: int = r, w: int = w) -> int:  # bound now: the loop moves on after the min()
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
                first: int = 0, record=None, budget: int | None = None,
                keeps: Sequence[torch.Tensor | None] | None = None,
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Logits of every batch, in as few passes as :func:`pack_passes` allows (``keeps``: as in
    :func:`run_batches`).  ``record``: a context manager factory taking a :class:`RowSlice`
    (:func:`bake.verify.check.record_outputs`), active during the pass that holds batch ``first``; returns what
    it recorded of that batch's rows."""
    keeps = keeps or [None] * len(batches)
    outs: list[torch.Tensor | None] = [None] * len(batches)
    acts: dict[str, torch.Tensor] = {}
    for idxs in pack_passes([tuple(ids.shape) for ids, _ in batches], position_cap(vocab, budget)):
        sub, sub_keeps = [batches[i] for i in idxs], [keeps[i] for i in idxs]
        if first in idxs and record is not None:
            with record(row_slice(sub, idxs.index(first))) as acts:
                res = run_batches(run, sub, sub_keeps)
        else:
            res = run_batches(run, sub, sub_keeps)
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
