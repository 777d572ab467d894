"""Run lineas-train and lineas-bake on tiny models under the installed transformers; write what to compare.

Run by ``tests/test_cross_version.py`` once per environment (transformers 4.57 and 5.x):

    python tests/cross_version_run.py produce OUT        # models, maps, exports, logits of this version
    python tests/cross_version_run.py reload OTHER OUT   # this version's logits of OTHER's exports

The tiny models are built from configs and filled from a generator seeded per parameter name, so
both versions start from the same weights without sharing files (their random inits differ).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bake_fixtures import save_tokenizer  # noqa: E402
from tiny import COMMON, random_ids  # noqa: E402

# arch -> (sites regex for lineas-train, extra lineas-bake arguments, what the case covers)
CASES = {
    "llama": (r"model\.layers\.\d+\.(input|post_attention)_layernorm", [],
              "norm shifts into q/k/v and gate/up biases (attention_bias and mlp_bias switched on); "
              "rope_theta 50000, not the default"),
    "gemma2": (r"model\.layers\.\d+\.post_feedforward_layernorm", [],
               "affine modules (remote code): post_feedforward_layernorm feeds the residual stream"),
    "gemma": (r"model\.embed_tokens", ["--untie-embeddings"],
              "the scaled token embedding folded into its (untied) table"),
}
ROPE_THETA = 50000.0


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=ROPE_THETA)
    if arch == "gemma2":
        return tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    return tf.GemmaConfig(**COMMON, head_dim=16)


def _eager_attention_everywhere() -> None:
    """4.57 loads Gemma-2 with SDPA attention by default, 5.x with eager (it has no SDPA path for Gemma-2);
    the two kernels round differently (the learned Gemma-2 maps then differ by ~3e-4).  Every load in this
    process uses eager attention, so both versions compute the same floats and compare bit for bit."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("attn_implementation", "eager")
        return original(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _fill(model: torch.nn.Module) -> None:
    """Weights that depend only on parameter names: norms near their identity, the rest small."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_((0.2 if "norm" in name else 0.08) * noise)
            if "norm" in name and not type(model).__name__.startswith("Gemma"):
                p.add_(1.0)  # Llama's RMSNorm is w*x, Gemma's (1+w)*x


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(random_ids(batch=2, length=10)).logits.contiguous()


def produce(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bake.cli.main import main as bake_main
    from lineas.cli import main as train_main

    for arch, (sites, bake_args, _) in CASES.items():
        case = out / arch
        model_dir, maps, export = case / "model", case / "maps.safetensors", case / "export"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32, attn_implementation="eager")
        _fill(model)
        model.save_pretrained(model_dir)
        save_tokenizer(model_dir)
        rc = train_main(["--model", str(model_dir), "--source", "negative", "--target", "positive", "--sites", sites,
                         "--steps", "15", "--batch-size", "8", "--lr", "0.01", "--seed", "0", "--quiet",
                         # every part trained: the Gemma case steers the tied embedding, which --foldable (planned
                         # without --untie-embeddings) leaves out; this compares the majors, not foldability
                         "--foldable", "off", "--out", str(maps)])
        if rc:
            raise SystemExit(f"lineas-train failed on {arch} (exit {rc})")
        rc = bake_main(["--model", str(model_dir), "--maps", str(maps), "--strength", "1.0", "--format", "hf",
                        "--out", str(export), "--verify-tokens", "4", *bake_args])
        if rc:
            raise SystemExit(f"lineas-bake failed on {arch} (exit {rc})")
        save_file({"logits": _logits(export)}, str(case / "logits.safetensors"))
    import transformers

    (out / "version.json").write_text(json.dumps({"transformers": transformers.__version__}))


def reload(other: Path, out: Path) -> None:
    for arch in CASES:
        save_file({"logits": _logits(other / arch / "export")}, str(out / arch / "logits_of_other.safetensors"))


if __name__ == "__main__":
    _eager_attention_everywhere()
    if sys.argv[1:2] == ["produce"] and len(sys.argv) == 3:
        produce(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["reload"] and len(sys.argv) == 4:
        reload(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
