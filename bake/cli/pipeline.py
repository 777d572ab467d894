"""``lineas-bake --model <pipeline folder>``: the CLI's diffusers-pipeline branch."""

from __future__ import annotations

from bake.cli.options import (
    DEFAULT_VERIFY_STEPS,
    EXIT_BAD_INPUT,
    EXIT_OK,
    check_out_name,
    fail_cli,
    given_options,
)
from bake.families.base import Family
from bake.families.detect import other_options
from bake.families.diffusers.bake import bake_pipeline, plan_pipeline_bake
from bake.plan.diffusers import NO_STANDARD_FALLBACK
from bake.results import default_out_dir


def pipeline_cli(args, maps: list[tuple[str, float]], cmd: str, formats: tuple[str, ...], family: Family) -> int:
    """``lineas-bake --model <pipeline folder>``: the CLI's pipeline branch (main dispatches here, with
    ``--format`` already parsed by :func:`bake.formats.export.parse_formats`)."""
    if args.require_runtime:  # the runtime matrix answers for causal-LM runtimes, none of which runs a pipeline
        return fail_cli(f"--require-runtime {' '.join(args.require_runtime)}: the runtime matrix covers causal LMs; a "
                     "baked pipeline loads in plain diffusers (no custom code, always) and, with --format hf,onnx, "
                     "in ONNX Runtime", EXIT_BAD_INPUT)
    llm_only = given_options(args, other_options(family))
    if llm_only:  # said, not silently ignored: a pipeline is loaded whole (no out-of-core engine here)
        return fail_cli(f"{', '.join(llm_only)}: causal-LM option(s); a diffusers pipeline is loaded whole in float32 "
                     "(no --max-memory bound), has no embeddings to untie and verifies --verify-steps denoising "
                     "steps, not tokens", EXIT_BAD_INPUT)
    if "hf" not in formats or set(formats) - {"hf", "onnx"} or args.dtype != "float32":
        return fail_cli(f"a diffusers pipeline exports --format hf or hf,onnx with --dtype float32 here (got --format "
                     f"{args.format} --dtype {args.dtype})", EXIT_BAD_INPUT)
    out = args.out or default_out_dir(args.model)
    if args.dry_run:
        plan = plan_pipeline_bake(args.model, maps, trust_remote_code=args.trust_remote_code,
                                  ignore_model_mismatch=args.ignore_model_mismatch)
        print(plan.to_table())
        if plan.affine_sites:
            return fail_cli(f"{len(plan.affine_sites)} site(s) need an affine module; {NO_STANDARD_FALLBACK}",
                         EXIT_BAD_INPUT)
        if args.push_to_hub:
            from bake.cli.push import describe_push_after_export

            print(describe_push_after_export(out, args))
        return EXIT_OK
    check_out_name(out)
    output = getattr(args, "output", None)
    if output is not None:  # for an interrupt: is the export in place (bake.cli.handler.Output)?
        output.claim(out)
    result = bake_pipeline(args.model, maps, out=out, overwrite=args.overwrite, verify=not args.no_verify,
                           steps=DEFAULT_VERIFY_STEPS if args.verify_steps is None else args.verify_steps,
                           trust_remote_code=args.trust_remote_code,
                           allow_rebake=args.allow_rebake, ignore_model_mismatch=args.ignore_model_mismatch,
                           command=cmd, device=args.device, formats=formats)
    print(result.plan.to_table())
    print()
    print(result.report.to_table())
    if result.onnx_report is not None:
        print(f"\nONNX ({result.onnx_report.ort_class}, {result.onnx_report.provider}):")
        print(result.onnx_report.to_table())
    print(f"\nwrote {result.folder}")
    if args.push_to_hub:
        from bake.cli.push import run_push

        if output is not None:
            output.pending = f"the upload to {args.push_to_hub}"
            output.resume = f"lineas-bake push {result.folder} {args.push_to_hub}"
        return run_push(result.folder, args.push_to_hub, revision=args.revision, private=args.private,
                        commit_message=args.commit_message)
    return EXIT_OK
