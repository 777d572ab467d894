"""Pooled activation collection at steering sites.

The learners compare *pooled* activations: per sequence, the mean of a site's
output over every axis but the batch and feature axes, leaving out padding
tokens (:func:`lineas.axis.pool_features`; the feature axis is
:func:`lineas.axis.feature_axis`, the rule the hooks and the baker use, so a
Qwen3 ``q_norm`` ``[B, L, heads, head_dim]`` pools to ``[B, head_dim]``).
Pooling is only for the loss -- the maps themselves act per token.

A forward pass only needs to reach the last site, so :func:`run_to_sites`
raises a private exception from the last site's hook and catches it: the
layers after it and the LM head are never computed.

The hook that records a site's output also applies that site's affine map
(through :func:`lineas.hooks.apply_affine`, the same arithmetic the steering
hooks and the baker use), so training steers exactly as inference will.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import regex
import torch
from torch import nn

from lineas.axis import feature_axis, pool_features
from lineas.embedding_scale import outside_scale
from lineas.hooks import SteeringError, apply_affine, similar_names


class SiteMatchError(SteeringError):
    """A ``--sites`` regex matches no module (the message lists similar names)."""


# -- site selection -----------------------------------------------------------
def match_sites(model: nn.Module, regexes: Sequence[str]) -> list[str]:
    """Module names that full-match any regex, in ``named_modules`` (forward) order.

    Every regex must match at least one module; otherwise :class:`SiteMatchError`
    names the regex and lists similar module names.
    """
    names = [n for n, _ in model.named_modules() if n]
    if not regexes:
        raise SiteMatchError("no site regex given")
    chosen: set[str] = set()
    for rx in regexes:
        hits = _full_matches(rx, names)
        if not hits:
            hint = similar_names(rx, names, n=8) or _same_leaf(rx, names)
            raise SiteMatchError(
                f"site regex {rx!r} matches no module of {type(model).__name__} (regexes must match the full name)"
                + (f"; similar names: {', '.join(hint)}" if hint else ""))
        chosen.update(hits)
    return [n for n in names if n in chosen]


MAX_SITE_REGEX = 2000  # characters; a site pattern is a module path, a few dozen characters
SITE_REGEX_SECONDS = 1.0  # matching one pattern against every module name must end within this


def _full_matches(rx: str, names: Sequence[str]) -> list[str]:
    """The ``names`` that ``rx`` full-matches, with the matching bounded in time: a pattern that backtracks
    catastrophically (``(a|aa)+x``) is refused with a :class:`SiteMatchError` after
    :data:`SITE_REGEX_SECONDS`, instead of running forever.  Python ``re`` syntax (the ``regex`` package,
    whose matcher can be stopped)."""
    if not isinstance(rx, str) or len(rx) > MAX_SITE_REGEX:
        raise SiteMatchError(f"site regex {str(rx)[:60]!r}... is {len(str(rx))} characters long; a site pattern is a "
                             f"module name pattern (at most {MAX_SITE_REGEX})")
    try:
        pattern = regex.compile(rx, flags=regex.VERSION0)
    except (regex.error, RecursionError, OverflowError) as e:
        raise SiteMatchError(f"site regex {rx!r} is not a valid regular expression: {e}") from None
    deadline = time.monotonic() + SITE_REGEX_SECONDS
    hits = []
    for n in names:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            if pattern.fullmatch(n, timeout=left):
                hits.append(n)
        except TimeoutError:
            raise SiteMatchError(f"site regex {rx!r} takes more than {SITE_REGEX_SECONDS:g} s to match the module "
                                 "names (catastrophic backtracking, e.g. nested repeats like (a+)+): simplify it, "
                                 "e.g. 'model\\.layers\\.\\d+\\.mlp'") from None
    return hits


def _same_leaf(rx: str, names: list[str]) -> list[str]:
    """Fallback hint: modules whose last name component appears in the regex."""
    leaf = re.split(r"[^A-Za-z0-9_]", rx.split(".")[-1])[0] if rx else ""
    return [n for n in names if leaf and n.rsplit(".", 1)[-1] == leaf][:8]


# -- tokenised prompt sets ------------------------------------------------------
@dataclass(frozen=True)
class TokenSet:
    """Tokenised prompts (unpadded id lists); batches are padded on the right."""

    ids: tuple[tuple[int, ...], ...]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` for the given rows.

        Right padding keeps the real tokens at positions 0..n-1, so a causal
        model computes the same activations for them as without padding.
        """
        rows = [self.ids[i] for i in index]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    def batches(self, batch_size: int, device="cpu") -> Iterable[dict[str, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))), device)


def tokenize(tokenizer, prompts: Sequence, max_length: int | None) -> TokenSet:
    """Tokenise texts with truncation to ``max_length``; lists of ints are taken as ids.

    Token-id prompts let tests and tokenizer-less checkpoints train too.
    """
    if not prompts:
        raise ValueError("empty prompt set")
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer, but the model has none (pass token ids instead)")
            ids = tokenizer(p, truncation=max_length is not None, max_length=max_length)["input_ids"]
        else:
            ids = [int(i) for i in p]
            if max_length is not None:
                ids = ids[:max_length]
        if not ids:
            raise ValueError(f"prompt {p!r} tokenises to zero tokens")
        rows.append(tuple(ids))
    pad = 0
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TokenSet(tuple(rows), int(pad))


def check_distinguishable(tokenizer, source, target, max_length: int | None) -> None:
    """Refuse (``ValueError``) source and target prompt sets (:class:`lineas.prompts.PromptSet`) that the tokenizer
    turns into the same token ids: identical sets, or texts differing only in what the tokenizer drops or maps to
    one unknown id.  The model sees no difference, so training would write maps fitted to noise."""
    src = sorted(tokenize(tokenizer, source.texts, max_length).ids)
    tgt = sorted(tokenize(tokenizer, target.texts, max_length).ids)
    if src == tgt:
        raise ValueError(f"--source {source.description!r} and --target {target.description!r} tokenise to the same "
                         f"token ids ({len(src)} prompt(s)): the model cannot tell them apart, so there is nothing "
                         "to learn; give prompt sets that differ")


# -- forward to the last site -------------------------------------------------------
class _StopForward(Exception):
    """Raised by the last site's hook to end the forward pass early."""


@runtime_checkable
class RepeatedCalls(Protocol):
    """A batch whose forward calls every site several times, e.g. once per denoising step of a
    diffusers pipeline (:mod:`lineas.learn.pipeline_collect`).  Every call is pooled, and
    ``pool_calls(site, pooled_calls)`` combines them into ``[N, D]``; the forward may stop after the
    last site's ``calls_per_site``-th call.  Any other batch keeps a site's first call only."""

    calls_per_site: int

    def pool_calls(self, site: str, calls: list[torch.Tensor]) -> torch.Tensor: ...


class _PoolHook:
    """Steers (optionally) and records a site's activation: ``outside`` times the module output (1 but for a
    4.x Gemma embedding, :mod:`lineas.embedding_scale`), the map acting on that activation as in the hooks.
    ``every_call``: pool every call of the module (a :class:`RepeatedCalls` batch), else its first only."""

    def __init__(self, site: str, store: dict, mask_ref: list, affine=None, stop: bool = False,
                 every_call: bool = False, stop_after: int = 1, outside: float = 1.0):
        self.site, self.store, self.mask_ref, self.affine, self.stop = site, store, mask_ref, affine, stop
        self.every_call, self.stop_after, self.outside = every_call, stop_after, outside

    def __call__(self, module, inputs, output):
        head = output[0] if isinstance(output, (tuple, list)) else output
        axis = feature_axis(module, head.dim())  # the rule the hooks and the baker use
        if self.affine is not None:
            head = apply_affine(head, self.affine[0], self.affine[1], self.site, axis, self.outside)
        calls = self.store.setdefault(self.site, [])
        if self.every_call or not calls:  # a module called twice in one LM forward: keep its first call
            try:
                activation = head if self.outside == 1.0 else head * self.outside
                calls.append(pool_features(activation, axis, self.mask_ref[0]))
            except ValueError as e:
                raise SteeringError(f"site {self.site!r}: {e}") from None
        if self.stop and len(calls) >= self.stop_after:
            raise _StopForward
        if self.affine is None:
            return None
        return type(output)((head, *output[1:])) if isinstance(output, (tuple, list)) else head


def call_model(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if _accepts_use_cache(model):
            kwargs.setdefault("use_cache", False)
        model(**kwargs)
    else:
        model(batch)


def _accepts_use_cache(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "use_cache")


def run_hooked(model: nn.Module, batch, hooks: Mapping[str, object]) -> None:
    """Run ``batch`` with a forward hook on each named site; a hook may end the pass early
    by raising ``_StopForward``.  Hooks are always removed, also on error."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for site, hook in hooks.items():
            if site not in modules:
                raise SteeringError(f"unknown site {site!r}")
            handles.append(modules[site].register_forward_hook(hook))
        try:
            call_model(model, batch)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


def run_to_sites(model: nn.Module, batch, sites: Sequence[str],
                 affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 stop_early: bool = True) -> dict[str, torch.Tensor]:
    """Run ``batch`` through ``model`` and return pooled (steered) outputs per site.

    ``affines`` maps a site to its ``(scale, shift)``; those sites are steered
    (gradients flow to the tensors when they require grad).  With
    ``stop_early`` the forward pass ends right after the last site in ``sites``
    (``sites`` must be in forward order).  Sites in ``affines`` but not in
    ``sites`` are steered too, as long as the forward reaches them.
    """
    affines = dict(affines or {})
    store: dict[str, list[torch.Tensor]] = {}
    mask_ref = [batch.get("attention_mask") if isinstance(batch, Mapping) else None]
    watched = list(dict.fromkeys([*sites, *affines]))
    repeated = isinstance(batch, RepeatedCalls)
    stop_after = batch.calls_per_site if repeated else 1
    modules = dict(model.named_modules())
    run_hooked(model, batch, {
        site: _PoolHook(site, store, mask_ref, affines.get(site), stop=stop_early and bool(sites) and site == sites[-1],
                        every_call=repeated, stop_after=stop_after,
                        outside=outside_scale(model, modules[site]) if site in modules else 1.0)
        for site in watched
    })
    missing = [s for s in sites if s not in store]
    if missing:
        raise SteeringError(f"the forward pass never reached site(s) {missing}")
    return {s: batch.pool_calls(s, store[s]) if repeated else store[s][0] for s in sites}


def collect_pooled(model: nn.Module, tokens: TokenSet, sites: Sequence[str], *, batch_size: int,
                   affines=None, device="cpu", progress=None, stop_early: bool = True) -> dict[str, torch.Tensor]:
    """Pooled outputs ``[N, D]`` (float32) of every site for a whole prompt set, no gradients."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    with torch.no_grad():
        for batch in tokens.batches(batch_size, device):
            got = run_to_sites(model, batch, sites, affines, stop_early=stop_early)
            for s in sites:
                out[s].append(got[s])
            if progress is not None:
                progress.update(len(batch["input_ids"]) if isinstance(batch, Mapping) else len(batch))
    return {s: torch.cat(v) for s, v in out.items()}


def forward_order(model: nn.Module, batch, sites: Sequence[str]) -> list[str]:
    """``sites`` sorted by when the forward pass first reaches them.

    ``named_modules`` order is definition order, which differs from execution
    order (a Llama layer defines ``self_attn, mlp, input_layernorm, ...`` but
    runs ``input_layernorm`` first); incremental fitting, early stopping and
    the maps' application order all need execution order.  One probe pass
    with no gradients, stopped once every site has fired.
    """
    seen: list[str] = []
    remaining = set(sites)

    def make(site):
        def hook(module, inputs, output):
            if site in remaining:
                remaining.discard(site)
                seen.append(site)
                if not remaining:
                    raise _StopForward
        return hook

    with torch.no_grad():
        run_hooked(model, batch, {s: make(s) for s in sites})
    if remaining:
        raise SteeringError(f"the forward pass never reached site(s) {sorted(remaining)}")
    return seen
