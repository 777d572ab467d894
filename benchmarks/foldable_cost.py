"""What does training only what folds cost?  ``--foldable on`` against ``--foldable off`` on Gemma-2.

A tiny random Gemma-2 (real Gemma2Config, 4 layers, hidden 128; norm weights perturbed as in
tests/tiny.py) with all four norms of every layer steered (16 sites), trained on the built-in
sentiment sets (negative -> positive, 76 sentences each, a word-level tokenizer built from them,
offline) with lineas-train's defaults.  Per method, foldable vs free: the full-data pooled W2
(the training report's mean over sites; no holdout), the trained parameter count, and the affine
modules ``lineas-bake`` needs for the maps (the bake planner on the trained maps).

Then, on paper (meta skeleton, no weights): a Gemma-2-2B-shaped model with the same four norms of
all 26 layers (104 sites): affine modules for free maps against foldable ones.

    python benchmarks/foldable_cost.py                      # prints one JSON object
    python benchmarks/foldable_cost.py --steps 200 --methods lineas
"""

from __future__ import annotations

import argparse
import json
import time

import torch

NORMS = r"model\.layers\.\d+\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm"


def word_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tiny_gemma2(vocab: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Gemma2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                          sliding_window=16, query_pre_attn_scalar=32)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # a fresh Gemma norm has w = 0: perturb, as tests/tiny.py does
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def gemma2_2b_on_paper() -> dict:
    """Affine modules for the four norms of all 26 layers of a Gemma-2-2B-shaped skeleton (meta device)."""
    import transformers as tf
    from accelerate import init_empty_weights

    from bake.plan.foldable import plan_foldable
    from bake.plan.planner import plan
    from lineas.collect import match_sites
    from lineas.maps import SiteMap

    cfg = tf.Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256)
    with init_empty_weights():
        skeleton = tf.AutoModelForCausalLM.from_config(cfg)
    sites = match_sites(skeleton, [NORMS])
    dims = dict.fromkeys(sites, cfg.hidden_size)
    fold = plan_foldable(skeleton, dims, "on")
    free = plan(skeleton, {s: SiteMap(torch.full((d,), 1.1), torch.full((d,), 0.1)) for s, d in dims.items()})
    masked = plan(skeleton, {s: SiteMap(torch.full((d,), 1.1) if fold[s].scale else torch.ones(d),
                                        torch.full((d,), 0.1) if fold[s].shift else torch.zeros(d))
                             for s, d in dims.items()})
    return {"sites": len(sites), "free": {"affine_modules": len(free.affine_sites), "plan": free.summary()},
            "foldable": {"affine_modules": len(masked.affine_sites), "plan": masked.summary(),
                         "frozen_shifts": sum(not fold[s].shift for s in sites),
                         "frozen_scales": sum(not fold[s].scale for s in sites)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="LinEAS steps (default: lineas-train's)")
    p.add_argument("--methods", nargs="+", default=["lineas", "linear-act"], choices=["lineas", "linear-act"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bake.plan.planner import plan
    from lineas.learn.train import TrainConfig, learn_maps
    from lineas.prompts import load_prompts

    src, tgt = load_prompts("negative"), load_prompts("positive")
    tok = word_tokenizer(src.texts + tgt.texts)
    model = tiny_gemma2(len(tok), args.seed)
    steps = args.steps or TrainConfig().steps
    runs = []
    for method in args.methods:
        for foldable in ("off", "on"):
            t0 = time.perf_counter()
            r = learn_maps(model, tok, src.texts, tgt.texts, [NORMS], method=method, steps=steps, seed=args.seed,
                           foldable=foldable, progress=False)
            bake_plan = plan(model, r.maps.maps)
            runs.append({"method": method, "foldable": foldable, "sites": len(r.maps),
                         "trained_parameters": sum(m.dim * (p.scale + p.shift) for m, p in
                                                   ((r.maps[s], r.foldable[s]) for s in r.maps)),
                         "w2_before": r.w2_before, "w2_after": r.w2_after,
                         "w2_change_pct": round(100 * (r.w2_after / r.w2_before - 1), 1),
                         "affine_modules": len(bake_plan.affine_sites), "bake_plan": bake_plan.summary(),
                         "seconds": round(time.perf_counter() - t0, 1)})
    out = {"model": "tiny Gemma-2 (4 layers, hidden 128, random weights)", "sites": NORMS, "steps": steps,
           "data": "builtin negative -> positive, full data (no holdout)", "runs": runs,
           "gemma2_2b_shaped_plan": gemma2_2b_on_paper()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
