"""Does ``bake()`` accept realistic random maps?  SmolLM2-135M, all 60 input/post-attention norms,
scale ~ U(1-a, 1+a), shift ~ U(-a, a); prints one JSON object per magnitude with the verdict,
the in-memory check's metrics and the max-relative limit it was held to.

    python benchmarks/bake_random_maps.py --magnitudes 0.05 0.1 0.2
    # the same on another tree, e.g. the code before the noise-floor limit:
    git archive 308a64a bake lineas | tar -x -C /tmp/base && PYTHONPATH=/tmp/base python benchmarks/bake_random_maps.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--magnitudes", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bake_fixtures import uniform_maps

    from bake import VerificationError, bake
    from lineas.models import load_model

    loaded = load_model("smollm2-135m")
    n = loaded.model.config.num_hidden_layers
    sites = [f"model.layers.{i}.{k}" for i in range(n) for k in ("input_layernorm", "post_attention_layernorm")]
    for a in args.magnitudes:
        maps = uniform_maps(loaded.model, sites, a, seed=args.seed)
        try:
            check, verified = bake(loaded.model, maps, 1.0, tokenizer=loaded.tokenizer).report.checks[0], True
        except VerificationError as e:
            check, verified = e.report.checks[0], False
        print(json.dumps({"magnitude": a, "sites": len(sites), "verified": verified, "max_rel": check.max_rel,
                          "limit": getattr(check, "max_rel_limit", check.tolerance.max_rel),
                          "mean_kl": check.mean_kl, "top1": check.top1,
                          "greedy": f"{check.greedy_matched}/{check.greedy_total}", "failures": check.failures}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
