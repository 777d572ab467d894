"""How far a GGUF file in llama.cpp is from the hooked model, with a float32 and llama.cpp's default float16
KV cache (the numbers behind the ``gguf-*`` rows of bake/verify/tolerances.py).

    python benchmarks/gguf_kv_cache.py --model smollm2-135m --maps maps.safetensors \\
        --gguf OUT/gguf/model-f32.gguf [--gguf OUT/gguf/model-q8_0.gguf] [--tokens 32]

Prints JSON: per file and cache type, max abs / max rel logit error, mean KL, top-1 on the verification
probes, and the first greedy divergence of each built-in greedy prompt (decoded through llama.cpp's cache).
"""

from __future__ import annotations

import argparse
import json

import torch

from bake.formats.llamacpp import greedy_decode, llamacpp_runner, load_llamacpp
from bake.verify.check import compare, first_divergence, record_reference
from bake.verify.tolerances import Tolerance
from lineas.maps import SteeringMaps
from lineas.models import load_model

MEASURE = Tolerance(name="measure", max_rel=None, max_mean_kl=None, min_top1=None, greedy_identical=False,
                    gating=False, reason="measurement only")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--maps", required=True)
    p.add_argument("--gguf", action="append", required=True)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    loaded = load_model(args.model)
    maps = SteeringMaps.load(args.maps)
    ref = record_reference(loaded.model, {s: (maps[s].scale, maps[s].shift) for s in maps.sites},
                           tokenizer=loaded.tokenizer, n_tokens=args.tokens, noise_floor=False)
    rows = []
    for path in args.gguf:
        for f32_cache in (True, False):
            with load_llamacpp(path, f32_cache=f32_cache) as llm:
                check, _ = compare(llamacpp_runner(llm), ref, MEASURE, label=path)
                decoded = greedy_decode(llm, ref.greedy_prompts, args.tokens)
            rows.append({"file": path, "kv_cache": "f32" if f32_cache else "f16 (llama.cpp default)",
                         "max_abs": check.max_abs, "max_rel": check.max_rel, "mean_kl": check.mean_kl,
                         "top1": check.top1, "greedy_first_divergence": [
                             first_divergence(w, g) for w, g in zip(ref.greedy, decoded.tokens)]})
    print(json.dumps({"model": args.model, "maps": args.maps, "tokens": args.tokens,
                      "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
