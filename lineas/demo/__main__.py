"""``python -m lineas.demo``: the end-to-end demo (learn, bake, evaluate, check runtimes, record)."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lineas.demo.pipeline import METHODS, DemoConfig, DemoError, run_demo, set_threads
from lineas.learn.config import ConfigError
from lineas.threads import pick_threads

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2

DESCRIPTION = """\
End-to-end demo on the embedded SmolLM2-135M-Instruct (CPU, ~10 minutes):

  1. learn negative -> positive steering maps with lineas-train (LinEAS, and
     Linear-AcT on the same data for comparison), sites: both RMSNorms of
     every layer;
  2. bake the LinEAS maps at strength 1 with lineas-bake --format
     hf,onnx,gguf,gguf-q4_k_m --check-runtime vllm,mlx, and the same maps into
     the embedded Q4_1 GGUF file in place (lineas-bake --model <file>.gguf);
  3. evaluate unsteered / LinEAS / Linear-AcT at strengths 0, 0.5, 1:
     sample generations, VADER sentiment and positive rate on held-out
     neutral prompts, perplexities;
  4. reload the baked checkpoint with plain transformers, the ONNX graph in
     ONNX Runtime and the GGUF files in llama.cpp, check their greedy tokens
     and text against the hooked model (vLLM's and MLX's come from the bake's
     own check), and time base / hooked / baked generation in the same run;
  5. write results/<run>/results.json and summary.md; the baked model stays in
     results/<run>/baked-lineas, and the push command that publishes it is
     printed.
"""

EPILOG = """\
exit codes: 0 done (expectations are reported in summary.md, met or not);
1 a step failed, or a baked runtime did not reproduce the hooked model's
tokens; 2 bad arguments.

example:
  python -m lineas.demo --run smollm2-positive
  python -m lineas.demo --steps 30 --n-eval 16 --methods lineas   # quicker
"""


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m lineas.demo", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--run", metavar="NAME", help="run name; results go to RESULTS/NAME (default: a timestamp)")
    g.add_argument("--results", default="results", metavar="DIR", help="results folder (default: results)")
    g.add_argument("--model", default=d.model, help=f"model alias or directory (default: {d.model})")
    g.add_argument("--threads", type=int, default=0,
                   help="torch/ONNX Runtime threads; 0 = all cores when idle, fewer on a busy machine (default: 0)")
    g.add_argument("--keep-models", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the baked model (HF, ONNX and GGUF files, ~1.5 GB) in the run folder, ready to serve "
                        "or publish (default: kept; --no-keep-models removes it at the end)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    t = p.add_argument_group("learning (passed to lineas-train)")
    t.add_argument("--source", default=d.source, help=f"source prompts (default: {d.source})")
    t.add_argument("--target", default=d.target, help=f"target prompts (default: {d.target})")
    t.add_argument("--sites", default=d.sites, help="site regex (default: both layernorms of every layer)")
    t.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated, from {', '.join(METHODS)}; the first LinEAS one is baked "
                        f"(default: {','.join(d.methods)})")
    tc = d.train
    t.add_argument("--steps", type=int, default=tc.steps, help="LinEAS steps (default: %(default)s)")
    t.add_argument("--lr", type=float, help=f"LinEAS learning rate (default: lineas-train's, {tc.lr})")
    t.add_argument("--optimizer", choices=["adam", "sgd"],
                   help=f"LinEAS optimizer (default: lineas-train's, {tc.optimizer.value})")
    t.add_argument("--batch-size", type=int, help=f"LinEAS batch (default: lineas-train's, {tc.batch_size})")
    t.add_argument("--sparsity-group", type=float,
                   help=f"LinEAS group-lasso weight (default: lineas-train's, {tc.sparsity_group})")
    t.add_argument("--sparsity-l1", type=float, help=f"LinEAS L1 weight (default: lineas-train's, {tc.sparsity_l1})")
    t.add_argument("--maps", action="append", default=[], metavar="METHOD=FILE",
                   help="skip learning METHOD and use FILE (e.g. lineas=maps.safetensors); repeatable")

    e = p.add_argument_group("evaluation")
    e.add_argument("--n-eval", type=int, default=d.n_eval, help=f"held-out prompts scored (default: {d.n_eval})")
    e.add_argument("--n-figure", type=int, default=d.n_figure, help=f"figure prompts scored (default: {d.n_figure})")
    e.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"tokens per evaluation generation (default: {d.max_new_tokens})")
    e.add_argument("--check-prompts", type=int, default=d.check_prompts,
                   help=f"runtime check prompts (default: {d.check_prompts})")
    e.add_argument("--check-tokens", type=int, default=d.check_tokens,
                   help=f"runtime check tokens per prompt (default: {d.check_tokens})")
    e.add_argument("--formats", default=d.formats, help=f"lineas-bake --format (default: {d.formats})")
    e.add_argument("--gguf-in-place", action=argparse.BooleanOptionalAction, default=d.gguf_in_place,
                   help="also bake the embedded Q4_1 GGUF file in place with the same maps (default: on)")
    e.add_argument("--check-runtime", default=d.check_runtimes, metavar="NAMES",
                   help=f"lineas-bake --check-runtime: serving runtimes the bake checks from text, each in its own "
                        f"environment ('' for none; default: {d.check_runtimes})")
    return p


def config_from_args(args) -> tuple[DemoConfig, dict[str, Path]]:
    from lineas.evaluate import load_eval_prompts

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    maps_in: dict[str, Path] = {}
    for item in args.maps:
        method, sep, path = item.partition("=")
        if not sep or method not in METHODS or not Path(path).is_file():
            raise ValueError(f"--maps {item!r}: expected METHOD=FILE with METHOD in {', '.join(METHODS)} and an "
                             "existing file")
        maps_in[method] = Path(path)
    n_fig, n_held = len(load_eval_prompts("figure")), len(load_eval_prompts("heldout"))
    for name, v, hi in (("--n-eval", args.n_eval, n_held), ("--n-figure", args.n_figure, n_fig),
                        ("--check-prompts", args.check_prompts, n_fig + n_held)):
        if not 1 <= v <= hi:
            raise ValueError(f"{name} must be in 1..{hi}, got {v}")
    for name, v in (("--max-new-tokens", args.max_new_tokens), ("--check-tokens", args.check_tokens)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    given = {k: getattr(args, k) for k in ("steps", "lr", "optimizer", "batch_size", "sparsity_group", "sparsity_l1")
             if getattr(args, k) is not None}
    try:  # lineas-train's own checks, the only ones
        train = replace(DemoConfig().train, **given)
    except ConfigError as e:
        raise ValueError(e.for_flag()) from None
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    cfg = DemoConfig(model=args.model, source=args.source, target=args.target, sites=args.sites,
                     train=train,
                     methods=methods, max_new_tokens=args.max_new_tokens, n_eval=args.n_eval,
                     n_figure=args.n_figure, n_samples=min(3, args.n_figure), check_prompts=args.check_prompts,
                     check_tokens=args.check_tokens, formats=args.formats,
                     check_runtimes=args.check_runtime, gguf_in_place=args.gguf_in_place,
                     threads=pick_threads(args.threads),
                     keep_models=args.keep_models)
    return cfg, maps_in


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("transformers", "optimum", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg, maps_in = config_from_args(args)
    except ValueError as e:
        print(f"lineas.demo: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run = args.run or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.results) / run
    if (run_dir / "results.json").exists():
        print(f"lineas.demo: error: {run_dir} already holds a results.json; pick another --run", file=sys.stderr)
        return EXIT_BAD_INPUT
    set_threads(cfg.threads)
    try:
        results = run_demo(cfg, run_dir, maps_in=maps_in)
    except DemoError as e:
        print(f"lineas.demo: error: {e}", file=sys.stderr)
        return EXIT_FAIL
    print((run_dir / "summary.md").read_text(encoding="utf-8"))
    print(f"\nwrote {run_dir / 'results.json'} and {run_dir / 'summary.md'}")
    if results["bake"].get("push_command"):
        print(f"\nthe baked model: {results['bake']['out']}\npublish it (add --dry-run to see what would be uploaded; "
              f"the token comes from HF_TOKEN or `hf auth login`):\n  {results['bake']['push_command']}")
    identical = all(c.get("identical") for n, c in results["runtime_check"]["comparisons_vs_hooked"].items()
                    if n != "base" and not c.get("advisory"))
    return EXIT_OK if identical else EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
