"""``lineas-bake``: fold steering maps into a model's weights, verify, export."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from bake.cli.handler import Output, guarded, wants_traceback
from bake.cli.options import (
    DEFAULT_VERIFY_STEPS,
    DEFAULT_VERIFY_TOKENS,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_TERMINATED,  # noqa: F401 (the exit codes, importable from here)
    EXIT_VERIFY,  # noqa: F401
    PROG,
    check_out_name,
    fail_cli,
    given_options,
)
from bake.errors import BakeError
from bake.families.base import Family, FamilyKind
from bake.formats.export import EXPORT_DTYPES, known_formats, parse_formats
from bake.formats.kinds import GGUF_FORMATS, check_request, export_bytes
from bake.plan.inputs import MAX_PLAIN_STRENGTH, check_strength_magnitude, parse_maps_arg
from bake.publish.card import command_line
from bake.publish.outdir import check_out_dir, run_scope
from bake.store.checkpoint import parse_memory, safetensors_folder
from lineas.models import ALIASES, checkpoint_numel, local_checkpoint, resolve_model

DESCRIPTION = """\
Bake steering maps into a model: fold each map y -> s*y + t into the weights
(norm weights/biases, linear rows, consumer biases; a small affine module where
no exact fold exists), verify in float32 that the baked model reproduces the
original model with the steering hooks attached, and export an HF folder
(safetensors, config, tokenizer, provenance, verification report, model card).
"""

EPILOG = f"""\
maps and strengths:
  --maps F              use F at --strength (default 1.0)
  --maps F:0.5          use F at strength 0.5
  several --maps        composed in the order given (F first, then G)

model aliases: {", ".join(sorted(ALIASES))}; or a local directory / Hub id.

exit codes:
  0  ok (or --dry-run printed the plan)
  2  bad input: unreadable/invalid maps file, unknown site, wrong dimension,
     NaN/inf values, non-finite strength or |λ| > {MAX_PLAIN_STRENGTH:g} without --allow-large-strength,
     unknown model, missing config.json, GGUF file, quantised model, unknown
     or unavailable --device; --out that exists, is the working directory or
     the model folder, is not writable or lacks the space for the export;
     maps already baked into the model (--allow-rebake) or learned on another
     model (--ignore-model-mismatch); weights that overflow --dtype (e.g.
     float16) when cast; a --max-memory that is unreadable or too small
     for the model's largest block; --format onnx for a model that cannot fit in RAM;
     --push-to-hub with HF_HUB_OFFLINE=1; a plan that a --require-runtime (or
     --format gguf: llama.cpp) cannot serve without custom code; a diffusers
     pipeline site with no exact fold (pipelines have no standard fallback);
     a --check-runtime that is unknown or whose environment is not installed.
     Nothing written.
  3  verification failed: the baked model does not reproduce the hooked model;
     nothing was written, the per-site report says where it diverges
  1  --push-to-hub failed or was interrupted (token, permissions, repo not found,
     Hub unavailable, upload mismatch); the verified export stays in --out:
     lineas-bake push it. Also an internal error (a bug: the one-line message
     says "please report this"; -v prints the traceback)
  130 interrupted (Ctrl-C), 143 terminated by SIGTERM: the unfinished export was
     removed (after a SIGKILL, the next export into the same parent folder
     removes the lineas_tmp_<pid>_* folder of the dead run). An interrupt after
     the export was placed at --out exits 0 with a note: the export is complete.
     llama.cpp's processes (--format gguf) end with lineas-bake, whatever ends it

examples:
  {PROG} --model smollm2-135m --maps positive.safetensors --strength 1.0 --dry-run
  {PROG} --model smollm2-135m --maps positive.safetensors --strength 1.0 --out smollm2-positive
  {PROG} --model ./my-model --maps a.safetensors --maps b.safetensors:0.5 --dtype bfloat16
  {PROG} --model ./llama-3-8b --maps tox.safetensors --max-memory 4GiB     (out of core: any size)
  {PROG} --model smollm2-135m --maps positive.safetensors --format hf,onnx --push-to-hub me/smollm2-positive
  {PROG} push smollm2-positive me/smollm2-positive     (upload an existing export; see {PROG} push --help)
  {PROG} --model ./sdxl-pipeline --maps anime.safetensors --strength 0.8 --out sdxl-anime   (diffusers folder)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="M",
                   help="model alias, local directory (a checkpoint or a diffusers pipeline) or Hub id (its "
                        "safetensors fetched into the Hugging Face cache first); a causal LM bakes out of core")
    p.add_argument("--maps", required=True, action="append", metavar="F[:λ]",
                   help="lineas-maps file, optionally with its own strength; repeat to compose several")
    p.add_argument("--strength", default="1.0", metavar="λ",
                   help="strength for --maps given without ':λ' (default: 1.0); must be finite")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <model-name>-steered)")
    p.add_argument("--format", default="hf", metavar="F[,F]",
                   help=f"export formats, comma-separated (available: {', '.join(known_formats())}; default: hf)")
    p.add_argument("--dtype", default="float32", choices=list(EXPORT_DTYPES),
                   help="dtype of the exported weights (default: float32); bfloat16/float16 exports are also "
                        "reloaded and measured (top-1 agreement, KL) against the hooked float32 model")
    p.add_argument("--device", default="cpu", help="torch device for folding and verification (default: cpu)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="weights held in memory while verifying a local checkpoint, e.g. 4GiB or 8GB; blocks "
                        "beyond it are read from the checkpoint's shards as they run, so any model size bakes. "
                        "auto (default): the model's largest block plus 512 MiB. More is faster, up to the model's "
                        "size (then it runs whole)")
    p.add_argument("--dry-run", action="store_true", help="print the fold plan and exit without writing anything")
    p.add_argument("--require-standard", action="store_true",
                   help="fail (exit 2) if any site needs an affine module, so the export never needs remote code")
    p.add_argument("--require-runtime", action="append", default=[], metavar="NAME",
                   help="fail (exit 2) before any work unless NAME loads the export without custom code: "
                        "transformers, onnxruntime, llama.cpp, vllm or tgi (repeatable; --dry-run prints the "
                        "matrix and its reasons). --format gguf implies llama.cpp")
    p.add_argument("--check-runtime", default=None, metavar="NAME[,NAME]",
                   help="serve the written HF export in these runtimes before it is placed: vllm, mlx (each in its "
                        "own environment: make setup-vllm / setup-mlx, or LINEAS_VLLM_PYTHON / LINEAS_MLX_PYTHON), "
                        "from text prompts through the runtime's tokenizer; its tokenization and 8 x 32 greedy tokens "
                        "must match the hooked model's (lineas_serving_check.json). A missing environment: exit 2")
    p.add_argument("--untie-embeddings", action="store_true",
                   help="allow giving tied input/output embeddings separate copies when a map must fold into one")
    p.add_argument("--verify-tokens", type=int, default=None, metavar="N",
                   help=f"greedy tokens generated per verification prompt (default: {DEFAULT_VERIFY_TOKENS})")
    p.add_argument("--verify-steps", type=int, default=None, metavar="N",
                   help=f"diffusers pipelines: denoising steps of the verification image (default: "
                        f"{DEFAULT_VERIFY_STEPS})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--allow-rebake", action="store_true",
                   help="bake maps that the model already carries (its config.json lineas_baked record or "
                        "lineas_provenance.json); without it that is refused (exit 2): the steering would double")
    p.add_argument("--ignore-model-mismatch", action="store_true",
                   help="bake maps whose metadata names another model_type or config_sha256 than the model "
                        "(refused by default, exit 2); a warning is printed")
    p.add_argument("--allow-large-strength", action="store_true",
                   help=f"allow a strength with |λ| > {MAX_PLAIN_STRENGTH:g} (refused by default, exit 2: "
                        "almost always a typo such as 1e9)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress details, and print the traceback of an error")
    danger = p.add_argument_group("dangerous options")
    danger.add_argument("--no-verify", action="store_true",
                        help="skip verification: the export is NOT checked against the hooked model")
    danger.add_argument("--trust-remote-code", action="store_true",
                        help="run the base model's own Python code from its folder/Hub repo when loading it")
    from bake.cli.push import PUBLISH_HELP, add_publish_arguments

    add_publish_arguments(p.add_argument_group("publishing (talks to the Hub)", PUBLISH_HELP), with_repo=True)
    return p


def _maps_arg(args) -> list[tuple[str, float]]:
    from lineas.maps import check_strength

    default = check_strength(args.strength, "--strength")
    pairs = [parse_maps_arg(m, default) for m in args.maps]
    for path, lam in pairs:
        check_strength_magnitude(lam, f"strength for {path}", args.allow_large_strength)
    return pairs


def required_runtimes(names: Sequence[str], formats: Sequence[str]) -> tuple:
    """--require-runtime values, plus llama.cpp for a GGUF export (it must load the file)."""
    from bake.plan.runtimes import Runtime, parse_runtime

    try:
        wanted = [parse_runtime(n) for n in names]
    except ValueError as e:
        raise BadRuntimeError(str(e)) from None
    if any(f in GGUF_FORMATS for f in formats):
        wanted.append(Runtime.LLAMA_CPP)
    return tuple(dict.fromkeys(wanted))


class BadRuntimeError(BakeError, ValueError):
    """An unknown --require-runtime name."""


def _checked_out(args, model: str | None = None):
    """--out, checked before the model is loaded (writability, free space for the estimated export, not the
    working directory or the model's folder); the export checks again with the exact size.  ``model``: the
    local folder of ``--model`` (None: a Hub id not fetched yet, whose size is not known here)."""
    from bake.results import default_out_dir

    check_out_name(args.out or default_out_dir(args.model))
    local = model or resolve_model(args.model)
    n = checkpoint_numel(local)
    needed = export_bytes(n, EXPORT_DTYPES[args.dtype].itemsize, parse_formats(args.format)) if n else None
    if needed and args.dtype != "float32" and not args.no_verify:
        needed += n * 4  # out of core, the fold is checked on a float32 scratch copy (bake.formats.hf_stream)
    out = check_out_dir(args.out or default_out_dir(args.model), args.overwrite, model_dir=local,
                        needed_bytes=needed)
    args.output.claim(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``lineas-bake`` and ``lineas-bake push``, each under the one top-level handler (bake.cli.handler):
    no traceback without -v, Ctrl-C 130, SIGTERM 143 unless the export is already in place."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = wants_traceback(argv)
    if argv[:1] == ["push"]:  # `lineas-bake push DIR OWNER/NAME`: upload an existing export
        from bake.cli.push import PROG as PUSH_PROG
        from bake.cli.push import push_main

        unfinished = ("the upload did not finish; the local folder is unchanged, and the Hub repo has no new "
                      "commit unless the upload had already made it: run the same command again")
        return guarded(PUSH_PROG, lambda: push_main(argv[1:]), verbose=verbose,
                       output=Output(kind="upload", unfinished=unfinished))
    output = Output()
    return guarded(PROG, lambda: _main(argv, output), verbose=verbose, output=output)


def _main(argv: list[str], output: Output) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output = output  # --out is claimed (its state noted) when it is checked: see _checked_out
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    for flag, value in (("--verify-tokens", args.verify_tokens), ("--verify-steps", args.verify_steps)):
        if value is not None and value < 1:
            return fail_cli(f"{flag} must be >= 1, got {value}", EXIT_BAD_INPUT)
    if not args.push_to_hub and (args.private or args.revision or args.commit_message):
        return fail_cli("--private, --revision and --commit-message only apply with --push-to-hub", EXIT_BAD_INPUT)
    with run_scope():  # --out is locked from its first check to the end of the run (bake.publish.outdir)
        return _run(args, command_line([PROG, *argv]))


def _run(args, cmd: str) -> int:
    maps = _maps_arg(args)
    from bake.families.gguf_inplace import is_gguf_file

    if is_gguf_file(args.model):  # a GGUF file bakes in place (issue 27): bake.cli.gguf_inplace
        from bake.cli.gguf_inplace import gguf_cli

        return gguf_cli(args, maps, cmd)
    formats = parse_formats(args.format)
    check_request(formats, args.dtype)  # e.g. GGUF converts the float32 HF export: say so before any work
    from bake.formats.serving import check_serving_request, parse_check_runtimes

    check_serving_request(parse_check_runtimes(args.check_runtime), formats, args.dtype)  # its environments too
    if args.push_to_hub:
        from bake.publish.hub import check_online, check_repo_id

        check_repo_id(args.push_to_hub)  # bad OWNER/NAME: exit 2 before the slow part
        if not args.dry_run:
            check_online()
    from bake.families.detect import detect

    if not args.dry_run and not os.path.isdir(os.path.expanduser(args.model)) and \
            not os.path.isdir(resolve_model(args.model)):
        _checked_out(args)  # a Hub id: --out is checked before its download (and again with its size after)
    # A Hub id is fetched (a dry run plans from its config: no weight shards).
    model = local_checkpoint(args.model, trust_remote_code=args.trust_remote_code, shards=not args.dry_run)
    family = detect(model)  # a model_index.json folder: the pipeline family; anything else a causal LM
    return FAMILY_RUNS[family.kind](args, maps, cmd, formats, model, family)


def _causal_lm_cli(args, maps: list[tuple[str, float]], cmd: str, formats: tuple[str, ...], model: str,
                   family: Family) -> int:
    """The CLI's causal-LM branch: ``model`` is the local folder of ``--model`` (a Hub id fetched)."""
    from bake.api import bake, bake_folder, plan_bake
    from bake.families.detect import other_options
    from bake.results import default_out_dir

    progress = None if sys.stderr.isatty() else False  # tqdm: bars only on a terminal
    pipeline_only = given_options(args, other_options(family))
    if pipeline_only:  # said, not silently ignored
        return fail_cli(f"{', '.join(pipeline_only)}: diffusers-pipeline option(s), but {args.model!r} is not a "
                        "pipeline folder (no model_index.json): it bakes as a causal LM, verified on --verify-tokens "
                        f"greedy tokens (default {DEFAULT_VERIFY_TOKENS})", EXIT_BAD_INPUT)
    max_memory = None if args.max_memory in (None, "auto") else parse_memory(args.max_memory)
    verify_tokens = DEFAULT_VERIFY_TOKENS if args.verify_tokens is None else args.verify_tokens
    history = dict(allow_rebake=args.allow_rebake, ignore_model_mismatch=args.ignore_model_mismatch)
    common = dict(require_standard=args.require_standard, untie=args.untie_embeddings, device=args.device,
                  trust_remote_code=args.trust_remote_code, progress=progress,
                  require_runtimes=required_runtimes(args.require_runtime, formats), **history)
    # A safetensors checkpoint (a folder, or a Hub id's fetched files) bakes out of core (memory bounded by
    # --max-memory); one with other weights is loaded whole by transformers.
    local = safetensors_folder(model)
    if args.dry_run:
        plan = (bake_folder(args.model, maps, plan_only=True, max_memory=max_memory, **common) if local
                else plan_bake(args.model, maps, **common))
        print(plan.to_table())
        if args.push_to_hub:
            from bake.cli.push import describe_push_after_export

            print(describe_push_after_export(args.out or default_out_dir(args.model), args))
        return EXIT_OK
    out = _checked_out(args, model)  # fail before the slow part
    if local and "onnx" in formats:  # the ONNX graph needs the whole model: refuse now, not OOM-killed later
        from bake.formats.shard_writer import ONNX_MEMORY_COPIES
        from bake.store.checkpoint import check_whole_model_fits, load_skeleton

        check_whole_model_fits(load_skeleton(local, trust_remote_code=args.trust_remote_code),
                               step="the ONNX export", copies=ONNX_MEMORY_COPIES)
    run = dict(verify=not args.no_verify, verify_tokens=verify_tokens, **common)
    baked = (bake_folder(args.model, maps, max_memory=max_memory, **run) if local
             else bake(args.model, maps, **run))
    print(baked.plan.to_table())
    print()
    folder = baked.save_pretrained(out, dtype=args.dtype, formats=formats, overwrite=args.overwrite, command=cmd,
                                   progress=progress, check_runtimes=args.check_runtime or ())
    print(baked.export_report.to_table())
    for w in baked.export_report.warnings:
        print(f"warning: {w}")
    print(f"\nwrote {folder}")
    if args.push_to_hub:
        from bake.cli.push import run_push

        args.output.pending = f"the upload to {args.push_to_hub}"
        args.output.resume = f"{PROG} push {folder} {args.push_to_hub}"
        return run_push(folder, args.push_to_hub, revision=args.revision, private=args.private,
                        commit_message=args.commit_message, prog=PROG)
    return EXIT_OK


def _pipeline_cli(args, maps, cmd: str, formats: tuple[str, ...], model: str, family: Family) -> int:
    from bake.cli.pipeline import pipeline_cli

    return pipeline_cli(args, maps, cmd, formats, family)


FAMILY_RUNS = {FamilyKind.CAUSAL_LM: _causal_lm_cli, FamilyKind.DIFFUSERS_PIPELINE: _pipeline_cli}


if __name__ == "__main__":
    sys.exit(main())
