"""Text in: does a runtime's tokenizer give the ids the hooked model's tokenizer gives?

Every runtime check starts from text (:data:`bake.formats.gguf_greedy.GREEDY_PROMPTS`) and compares
tokenization first, naming the first prompt whose ids differ: a runtime that reads the export's tokenizer files
differently (a ``tokenizer_class`` its transformers version builds another tokenizer from, a GGUF vocabulary the
converter wrote wrongly) sends the model other ids for every text its users type, and no check on token ids
would see it.  Used by the HF reload (the export's files through this environment's transformers, which ONNX
Runtime's exports share), llama.cpp (its own tokenizer, from the GGUF metadata) and vLLM and MLX
(:mod:`bake.formats.serving_judge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bake.formats.gguf_greedy import GREEDY_PROMPTS
from bake.verify.probes import encode_prompt


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def first_id_difference(want: Sequence[int], got: Sequence[int]) -> int | None:
    """The first position where two id lists differ (a shorter list differs where it ends), or None."""
    for i, (a, b) in enumerate(zip(want, got)):
        if int(a) != int(b):
            return i
    return None if len(want) == len(got) else min(len(want), len(got))


def tokenization_mismatch(runtime: str, texts: Sequence[str], want: Sequence[Sequence[int]],
                          got: Sequence[Sequence[int]]) -> str | None:
    """The failure naming the first prompt ``runtime`` tokenizes differently from the hooked tokenizer, or None."""
    differ = [(i, pos) for i, (w, g) in enumerate(zip(want, got)) if (pos := first_id_difference(w, g)) is not None]
    if not differ:
        return None
    i, pos = differ[0]
    return (f"{runtime} tokenizes {len(differ)}/{len(texts)} prompts differently from the hooked model's tokenizer;"
            f" first: prompt {i} {_short(texts[i])}: {runtime} ids {list(got[i])} vs hooked ids {list(want[i])} "
            f"(first difference at position {pos})")


def hooked_prompt_ids(tokenizer, texts: Sequence[str] = GREEDY_PROMPTS) -> list[list[int]]:
    """Each prompt's ids as the hooked model's tokenizer gives them (the probes' encoding)."""
    return [encode_prompt(tokenizer, t).tolist() for t in texts]


def export_tokenizer_mismatch(folder: Path, tokenizer, label: str = "the export's tokenizer files") -> str | None:
    """The export's tokenizer files loaded by this environment's transformers (``AutoTokenizer``, no remote
    code) against the hooked tokenizer on the built-in prompts; a failure naming the first prompt, or None."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - a tokenizer the export's users cannot load is the finding
        return f"{label} do not load with transformers' AutoTokenizer: {type(e).__name__}: {e}"
    texts = list(GREEDY_PROMPTS)
    return tokenization_mismatch(label, texts, hooked_prompt_ids(tokenizer, texts), hooked_prompt_ids(loaded, texts))
