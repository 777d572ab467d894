"""LinEAS training speed: the real step against a naive one, measured in the same run.

Optimised step (lineas.learn.train.train_lineas): targets computed once and cached
sorted; model weights frozen (no weight-gradient graph); the forward stops
right after the last site (no later layers, no LM head).

Naive step: recomputes the target activations every step, keeps the model's
weights trainable (autograd builds their gradients too), and runs the whole
model including the LM head.

Prints one JSON object.  Examples:
    python benchmarks/train_speed.py                       # SmolLM2-135M, 60 sites
    python benchmarks/train_speed.py --model tiny-llama    # seconds, no checkpoint needed
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from lineas.collect import (
    collect_pooled,
    forward_order,
    match_sites,
    run_to_sites,
    tokenize,
)
from lineas.learn.ot import w2_to_sorted_target
from lineas.learn.train import TrainConfig, train_lineas

DEFAULT_SITES = r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)"
SOURCE = ["I hate how this {} turned out, it is awful.", "What a terrible, boring {}.",
          "The {} was a complete disappointment.", "Nobody should waste time on this {}."]
TARGET = ["I love how this {} turned out, it is wonderful.", "What a delightful, exciting {}.",
          "The {} was a complete joy.", "Everybody should spend time on this {}."]
NOUNS = ["movie", "meal", "trip", "book", "game", "song", "class", "party", "show", "day", "car", "phone",
         "hotel", "concert", "lecture", "garden"]


def prompts(templates, n):
    return [templates[i % len(templates)].format(NOUNS[(i // len(templates)) % len(NOUNS)]) for i in range(n)]


def load(name: str):
    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)
        def ids(texts):
            return [[(ord(c) * 7 + i) % 509 + 2 for i, c in enumerate(t)][:32] for t in texts]

        return LlamaForCausalLM(cfg).eval(), None, ids
    from lineas.models import load_model

    lm = load_model(name)
    return lm.model, lm.tokenizer, None


def naive_train(model, src, tgt_tok, sites, dims, cfg, device="cpu"):
    """The straightforward loop: a target batch recomputed every step, weights not frozen, full model + LM head."""
    params = {s: (torch.nn.Parameter(torch.ones(d, device=device)), torch.nn.Parameter(torch.zeros(d, device=device)))
              for s, d in dims.items()}
    flat = [p for pair in params.values() for p in pair]
    opt = torch.optim.SGD(flat, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, len(src))
    for _ in range(cfg.steps):
        idx = torch.randperm(len(src), generator=gen)[:bs].tolist()
        tidx = torch.randperm(len(tgt_tok), generator=gen)[:bs].tolist()
        with torch.no_grad():
            tgt = run_to_sites(model, tgt_tok.batch(tidx, device), sites, stop_early=False)
        pooled = run_to_sites(model, src.batch(idx, device), sites, params, stop_early=False)
        loss = torch.stack([w2_to_sorted_target(pooled[s], tgt[s].sort(0).values) for s in sites]).mean()
        opt.zero_grad()
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model alias/path, or tiny-llama (default: smollm2-135m)")
    ap.add_argument("--sites", default=DEFAULT_SITES, help="full-match site regex")
    ap.add_argument("--prompts", type=int, default=64, help="source and target prompts each (default: 64)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (default: 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, to_ids = load(args.model)
    src_texts, tgt_texts = prompts(SOURCE, args.prompts), prompts(TARGET, args.prompts)
    if to_ids is not None:
        src_texts, tgt_texts = to_ids(src_texts), to_ids(tgt_texts)
    src, tgt_tok = tokenize(tok, src_texts, args.max_length), tokenize(tok, tgt_texts, args.max_length)
    sites = forward_order(model, src.batch([0]), match_sites(model, [args.sites]))
    tgt = collect_pooled(model, tgt_tok, sites, batch_size=args.batch_size)
    dims = {s: v.shape[1] for s, v in tgt.items()}
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length)

    train_lineas(model, src, tgt, sites, TrainConfig(steps=1, batch_size=args.batch_size))  # warm-up
    t = time.perf_counter()
    train_lineas(model, src, tgt, sites, cfg)
    fast = args.steps / (time.perf_counter() - t)

    naive_train(model, src, tgt_tok, sites, dims, TrainConfig(steps=1, batch_size=args.batch_size))  # warm-up
    t = time.perf_counter()
    naive_train(model, src, tgt_tok, sites, dims, cfg)
    naive = args.steps / (time.perf_counter() - t)
    model.zero_grad(set_to_none=True)

    out = {"model": args.model, "sites": len(sites), "prompts": args.prompts, "batch_size": args.batch_size,
           "max_length": args.max_length, "steps": args.steps, "threads": torch.get_num_threads(),
           "steps_per_s": round(fast, 4), "naive_steps_per_s": round(naive, 4), "speedup": round(fast / naive, 2),
           "torch": torch.__version__, "machine": platform.machine()}
    json.dump(out, sys.stdout)
    print()
    return out


if __name__ == "__main__":
    main()
