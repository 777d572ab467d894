"""The causal-LM family (transformers ``AutoModelForCausalLM``): what :mod:`bake.api` bakes."""

from __future__ import annotations

import os
from dataclasses import dataclass

from bake.families.base import FamilyKind
from bake.verify.check import record_reference
from bake.verify.reference import Reference


@dataclass(frozen=True)
class CausalLMFamily:
    kind: FamilyKind = FamilyKind.CAUSAL_LM
    library_name: str = "transformers"
    pipeline_tag: str = "text-generation"
    options: tuple[tuple[str, str], ...] = (("--max-memory", "max_memory"), ("--untie-embeddings", "untie_embeddings"),
                                            ("--verify-tokens", "verify_tokens"), ("--check-runtime", "check_runtime"))

    def recognises(self, path: str | os.PathLike | None) -> bool:
        """Everything that is no other family's: a checkpoint folder, an alias or a Hub id."""
        return True

    def reference(self, model, affines, *, tokenizer=None, n_tokens: int = 8, progress: bool = False,
                  source: str | None = None) -> Reference:
        """The hooked logits and greedy tokens (:func:`bake.verify.check.record_reference`, which runs the guard;
        ``source``: the model's folder, whose processor builds a VLM's image+text probe)."""
        return record_reference(model, affines, tokenizer=tokenizer, n_tokens=n_tokens, progress=progress,
                                source=source)


CAUSAL_LM = CausalLMFamily()
