"""How many forward passes does the hooked reference take, and how long on the embedded SmolLM2-135M?

Records ``bake.verify.check.record_reference`` (n_tokens greedy tokens, noise floor on) with random maps on
all 60 input/post-attention norms, counting calls of the model's forward, on one CPU thread
(``--threads``) so that a busy machine moves the figure less.  Prints one JSON object: the passes, the
median wall seconds over ``--repeats`` (after one warm-up), and the first greedy continuation.  Run it
in two trees to compare them:

    PYTHONPATH=$PWD python benchmarks/reference_passes.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--magnitude", type=float, default=0.05)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bake.verify.check import record_reference
    from lineas.models import load_model, smollm2_checkpoint

    loaded = load_model(str(smollm2_checkpoint()))
    model, gen = loaded.model, torch.Generator().manual_seed(0)
    affines = {name: (1 + args.magnitude * torch.randn(mod.weight.numel(), generator=gen),
                      args.magnitude * torch.randn(mod.weight.numel(), generator=gen))
               for name, mod in model.named_modules() if name.endswith(("input_layernorm", "post_attention_layernorm"))}
    calls, real = [], model.forward
    model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)  # one call per forward pass

    def record():
        calls.clear()
        start = time.perf_counter()
        ref = record_reference(model, affines, tokenizer=loaded.tokenizer, n_tokens=args.n_tokens)
        return time.perf_counter() - start, ref

    record()  # warm-up
    runs = [record() for _ in range(args.repeats)]
    print(json.dumps({"sites": len(affines), "n_tokens": args.n_tokens, "passes": len(calls),
                      "median_s": round(statistics.median(s for s, _ in runs), 3),
                      "noise_floor_max_rel": runs[-1][1].noise_floor.max_rel, "greedy_0": runs[-1][1].greedy[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
