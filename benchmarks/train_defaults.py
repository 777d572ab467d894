"""Do lineas-train's settings learn?  Full-data pooled W2 (and, on SmolLM2, VADER) per configuration.

Each CONFIG is JSON of ``TrainConfig`` fields given on top of the defaults (``{}`` = the defaults;
``steps`` defaults to 100 here).  Prints one JSON line per configuration.

    python benchmarks/train_defaults.py --model tiny '{}' '{"optimizer": "sgd", "lr": 0.1}' '{"method": "linear-act"}'
    python benchmarks/train_defaults.py --model smollm2-135m --base '{}' '{"method": "linear-act"}'

tiny: tests/tiny.py's Llama, 24 + 24 unrelated random-id prompts, both norms of both layers.
smollm2-135m: negative -> positive built-in prompts, both norms of all 30 layers; then greedy
40-token continuations of the 36 held-out neutral prompts at strength 1, scored as lineas.demo does
(mean VADER compound, positive rate, generation perplexity under the unsteered model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NORMS = r"model\.layers\.\d+\.(input|post_attention)_layernorm"


def _tiny():
    from tiny import random_ids, tiny_model

    def prompts(n, seed):
        return [random_ids(1, 6 + i % 6, seed=seed + i)[0].tolist() for i in range(n)]

    return tiny_model("llama"), None, prompts(24, 0), prompts(24, 1000), None


def _smollm2():
    from lineas import evaluate as E
    from lineas.hooks import steered
    from lineas.models import load_model
    from lineas.prompts import load_prompts

    lm = load_model("smollm2-135m")
    held = E.load_eval_prompts("heldout")[:36]

    def score(maps):
        if maps is None:
            gens = E.generate(lm.model, lm.tokenizer, held, max_new_tokens=40, batch_size=26)
        else:
            with steered(lm.model, maps, 1.0):
                gens = E.generate(lm.model, lm.tokenizer, held, max_new_tokens=40, batch_size=26)
        s = E.sentiment(gens.texts)
        ppl = E.continuation_perplexity(lm.model, gens, pad_id=E.pad_token_id(lm.tokenizer))
        return {"vader_mean": round(s.mean_compound, 3), "positive_rate": round(s.positive_rate, 3),
                "generation_ppl": round(ppl, 3)}

    return lm.model, lm.tokenizer, load_prompts("negative").texts, load_prompts("positive").texts, score


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2-135m"], default="tiny")
    p.add_argument("--base", action="store_true", help="also score the unsteered model (smollm2-135m)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lineas.learn.train import learn_maps

    model, tok, src, tgt, score = _tiny() if args.model == "tiny" else _smollm2()
    if args.base and score is not None:
        print(json.dumps({"config": "unsteered", **score(None)}), flush=True)
    for spec in args.configs:
        kw = {"steps": 100, **json.loads(spec)}
        t0 = time.perf_counter()
        r = learn_maps(model, tok, src, tgt, [NORMS], progress=False, **kw)
        rec = {"config": kw, "w2_before": r.w2_before, "w2_after": r.w2_after,
               "w2_change_pct": round(100 * (r.w2_after / r.w2_before - 1), 1),
               "fell_back_to_linear_act": r.fell_back_to_linear_act, "seconds": round(time.perf_counter() - t0)}
        if score is not None:
            rec.update(score(r.maps))
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
