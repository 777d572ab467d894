"""Tokenizer files every runtime reads the same way (used by :func:`lineas.models.smollm2_checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path


def plain_fast_tokenizer(tok):
    """The GGUF's tokenizer as a plain ``PreTrainedTokenizerFast`` over its own ``tokenizer.json``.

    transformers' GGUF loader names the class ``LlamaTokenizer`` (the GGUF says ``llama``) over SmolLM2's
    byte-level BPE.  Saved as such, transformers 5.16-5.19 (what vLLM 0.32 pins) rebuilds a Metaspace
    Llama tokenizer from that name: "The movie was" became [504, 93, 749, 928, 292] instead of [504, 7704, 436],
    and decoding kept the byte markers.  Upstream's ``GPT2Tokenizer`` crashes 5.19 on its
    ``add_prefix_space: null``.  A plain fast tokenizer runs ``tokenizer.json`` as written in every version;
    ``clean_up_tokenization_spaces`` off because upstream SmolLM2 has it off (it would rewrite " ," on decode).

    The loader's ``tokenizer.json`` is also a hybrid: byte-level BPE with ``byte_fallback`` on and a
    SentencePiece-style decoder chain.  llama.cpp's converter takes that for a Llama SentencePiece vocabulary
    (``tokenizer.ggml.model = llama``), and llama.cpp then aborts tokenizing text.  Written as upstream has it
    (``byte_fallback`` off, a ByteLevel decoder) it tokenizes and decodes the same in transformers, and the
    converter recognises SmolLM2's pre-tokenizer (``smollm``, a ``gpt2`` vocabulary)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["model"]["byte_fallback"] = False
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    backend = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token,
                                   eos_token=tok.eos_token, unk_token=tok.unk_token, pad_token=tok.pad_token,
                                   chat_template=tok.chat_template, model_max_length=tok.model_max_length,
                                   clean_up_tokenization_spaces=False)


def name_tokenizer_class(path: Path, name: str) -> None:
    """Write ``tokenizer_class: name`` into a saved ``tokenizer_config.json``: transformers 5 saves its own
    ``TokenizersBackend``, a class 4.x does not have (it refuses the folder); both majors read
    ``PreTrainedTokenizerFast`` as the plain fast tokenizer over ``tokenizer.json``."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = name
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
