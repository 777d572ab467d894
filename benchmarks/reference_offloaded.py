"""The hooked reference of an out-of-core bake alone: how long its passes take and how much of that is
reading offloaded blocks, with no shard writer running beside it.

Loads ``--model`` (a checkpoint folder) with bounded memory as ``lineas-bake`` does
(``bake.store.checkpoint.load_bounded``, ``--max-memory auto``), records ``bake.verify.check.record_reference`` with
the maps of ``--maps`` at strength 1, and prints one JSON object:

  load_s        seconds to build and dispatch the model (resident blocks read)
  reference_s   seconds of ``record_reference`` (every forward pass, the noise floor, the statistics)
  passes        forward passes of the reference
  reads_s       seconds spent reading offloaded blocks, inside those passes
  peak_rss_gib  peak resident memory of this process, GiB

Run it in two trees to compare them (the checkpoint and maps from ``benchmarks/bake_scale.py``):

    PYTHONPATH=<tree> python benchmarks/reference_offloaded.py \\
        --model /work/bench-data/gemma2-2b --maps /work/bench-data/gemma2-2b.maps.safetensors
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint folder (safetensors shards and config.json)")
    ap.add_argument("--maps", required=True, help="a lineas-maps file for that model")
    ap.add_argument("--n-tokens", type=int, default=8, help="greedy tokens (lineas-bake --verify-tokens)")
    args = ap.parse_args(argv)

    import bake.store.checkpoint as checkpoint
    import bake.verify.passes as passes
    from bake.verify.check import record_reference
    from lineas.maps import SteeringMaps, effective_maps

    reads, calls = [0.0], [0]
    real_getitem, real_logits = checkpoint.ShardTensors.__getitem__, passes.model_logits

    def timed_getitem(self, name):  # what accelerate calls for an offloaded block's weight
        t = time.perf_counter()
        try:
            return real_getitem(self, name)
        finally:
            reads[0] += time.perf_counter() - t

    def counted_logits(*a, **k):
        calls[0] += 1
        return real_logits(*a, **k)

    checkpoint.ShardTensors.__getitem__ = timed_getitem
    passes.model_logits = counted_logits
    maps = SteeringMaps.load(args.maps)
    affines = {s: (m.scale, m.shift) for s, m in effective_maps([(maps, 1.0)]).items()}
    start = time.perf_counter()
    with checkpoint.load_bounded(args.model) as model:
        loaded = time.perf_counter()
        record_reference(model, affines, n_tokens=args.n_tokens)
        done = time.perf_counter()
        del model
    print(json.dumps({"load_s": round(loaded - start, 2), "reference_s": round(done - loaded, 2), "passes": calls[0],
                      "reads_s": round(reads[0], 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
