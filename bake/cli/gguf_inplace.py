"""``lineas-bake --model path/to/model-Q4_K_M.gguf``: the CLI's branch for a GGUF file baked in place
(:mod:`bake.families.gguf_inplace`)."""

from __future__ import annotations

import sys
from pathlib import Path

from bake.cli.options import DEFAULT_VERIFY_TOKENS, EXIT_BAD_INPUT, EXIT_OK, check_out_name, fail_cli

# Options that mean nothing for a file baked in place: (flag, argparse dest, the value that means "not given").
_NOT_HERE = (("--format", "format", "hf"), ("--dtype", "dtype", "float32"), ("--max-memory", "max_memory", None),
             ("--require-standard", "require_standard", False), ("--untie-embeddings", "untie_embeddings", False),
             ("--verify-steps", "verify_steps", None), ("--trust-remote-code", "trust_remote_code", False),
             ("--device", "device", "cpu"))


def default_gguf_out(model: str) -> str:
    return Path(model).stem + "-steered"


def gguf_cli(args, maps: list[tuple[str, float]], cmd: str) -> int:
    from bake.families.gguf_inplace import bake_gguf, plan_gguf

    given = [flag for flag, dest, unset in _NOT_HERE if getattr(args, dest, unset) != unset]
    if given:
        return fail_cli(f"{', '.join(given)}: not for a GGUF file baked in place ({args.model}): it is written as one "
                        "GGUF file with the source's tensor types, folded on the CPU and checked in llama.cpp; "
                        "llama.cpp is required (a shift it cannot load is refused)", EXIT_BAD_INPUT)
    runtimes = [r for r in args.require_runtime if r.strip().lower().replace("_", "-") not in
                ("llama.cpp", "llama-cpp", "llamacpp", "gguf")]
    if runtimes:
        return fail_cli(f"--require-runtime {' '.join(runtimes)}: a GGUF file baked in place is served by llama.cpp "
                        "only", EXIT_BAD_INPUT)
    history = dict(allow_rebake=args.allow_rebake, ignore_model_mismatch=args.ignore_model_mismatch)
    if args.dry_run:
        bake = plan_gguf(args.model, maps, **history)
        print(bake.plan.to_table())
        print(bake.writes_table())
        return EXIT_OK
    out = args.out or default_gguf_out(args.model)
    check_out_name(out)
    output = getattr(args, "output", None)
    if output is not None:  # for an interrupt: is the export in place (bake.cli.handler.Output)?
        output.claim(out)
    progress = None if sys.stderr.isatty() else False
    tokens = DEFAULT_VERIFY_TOKENS if args.verify_tokens is None else args.verify_tokens
    bake = bake_gguf(args.model, maps, out=out, overwrite=args.overwrite, verify=not args.no_verify,
                     verify_tokens=tokens, command=cmd, progress=progress, **history)
    print(bake.plan.to_table())
    print(bake.writes_table())
    print()
    print(bake.report.to_table())
    for w in bake.report.warnings:
        print(f"warning: {w}")
    print(f"\nwrote {bake.file}")
    if args.push_to_hub:
        from bake.cli.push import run_push

        if output is not None:
            output.pending = f"the upload to {args.push_to_hub}"
            output.resume = f"lineas-bake push {bake.folder} {args.push_to_hub}"
        return run_push(bake.folder, args.push_to_hub, revision=args.revision, private=args.private,
                        commit_message=args.commit_message)
    return EXIT_OK
