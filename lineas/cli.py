"""``lineas-train``: learn steering maps (LinEAS or Linear-AcT) and write a maps file.

Also ``lineas-train import-mlact PATH --out maps.safetensors`` to convert hooks
saved by apple/ml-act or apple/ml-lineas.  Exit codes: 0 ok, 2 bad input,
1 any other failure (an internal one says "please report this"; -v shows its
traceback), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from lineas import __version__
from lineas.io import ExitCode, atomic_write_text, fail
from lineas.train_out import check_output_file  # noqa: F401  (lives there; importable from here as before)

log = logging.getLogger("lineas.cli")

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = ExitCode.OK, ExitCode.FAIL, ExitCode.BAD_INPUT

DESCRIPTION = """\
Learn per-neuron affine steering maps T(y) = scale*y + shift at chosen modules
("sites") of a causal LM or of a diffusers pipeline's denoiser, so that the
model's pooled activations on SOURCE prompts match those on TARGET prompts, and
write them to a lineas-maps file.

Methods:
  lineas      (default) all maps trained jointly from identity (or, with
              --init linear-act, from the Linear-AcT maps) by Adam on the
              per-neuron 2-Wasserstein loss (LinEAS).
  linear-act  closed-form per-site fit, incremental over sites (Linear-AcT).
"""

EPILOG = """\
prompt sets:
  FILE.txt (one prompt per line), FILE.jsonl (objects with a "text" field),
  FILE.json (a list of strings), or a built-in set: builtin:NAME or just NAME
  ({builtins}).

subcommand:
  lineas-train import-mlact PATH --out maps.safetensors [--ignore-quantile-gate]
      Convert hooks saved by apple/ml-act or apple/ml-lineas (a
      "<module>[:idx].statedict" file or a folder of them, holding net.w1 and
      net.b1) into a lineas-maps file.  Linear-AcT hooks fitted with
      quantiles_src other than q_all are piecewise, not affine, and are refused
      unless --ignore-quantile-gate is given.  See: lineas-train import-mlact --help

examples:
  lineas-train --model smollm2-135m --source negative --target positive \\
      --sites 'model\\.layers\\.\\d+\\.(input|post_attention)_layernorm' \\
      --steps 100 --out maps.safetensors
  lineas-train --model ./my-model --source a.txt --target b.jsonl \\
      --sites 'model\\.layers\\.1[0-9]\\.mlp' --method linear-act --foldable off \\
      --out act.safetensors   # an MLP output folds nowhere: train it anyway
  lineas-train --model gemma-2-2b --source negative --target positive --foldable \\
      --sites 'model\\.layers\\.\\d+\\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm' \\
      --out g2.safetensors   # post_*/pre_feedforward shifts frozen: bakes with --require-standard
  lineas-train --model ./sdxl-lightning-4step --source photo --target anime \\
      --denoising-steps 4 --guidance-scale 0 --steps 200 --device cuda --out anime.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    from lineas.learn.config import Foldable, Init, Method, Optimizer, Schedule, TrainConfig
    from lineas.prompts import builtin_names

    p = argparse.ArgumentParser(
        prog="lineas-train", description=DESCRIPTION,
        epilog=EPILOG.format(builtins=", ".join(builtin_names()) or "none installed"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"lineas-bake {__version__}")

    io = p.add_argument_group("model and data")
    io.add_argument("--model", required=True, metavar="PATH_OR_ID",
                    help="local model directory, Hugging Face Hub id, or alias (smollm2-135m, gpt2, gemma-2-2b, ...)")
    io.add_argument("--source", required=True, metavar="FILE",
                    help="prompts whose activations are moved (the behaviour to steer away from)")
    io.add_argument("--target", required=True, metavar="FILE",
                    help="prompts whose activations are the goal (the behaviour to steer towards)")
    io.add_argument("--sites", action="append", metavar="REGEX",
                    help="regex that must FULL-match module names (repeatable); e.g. "
                         "'model\\.layers\\.\\d+\\.post_attention_layernorm'. Required for a causal LM; for a "
                         "diffusers pipeline the default is the denoiser's norms (see 'text-to-image pipelines')")
    io.add_argument("--out", required=True, metavar="maps.safetensors",
                    help="output maps file (written atomically; never a model or prompt file)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --report-json) file")

    d = TrainConfig()  # the defaults live there; they are shown, not repeated, here
    tr = p.add_argument_group("training")
    tr.add_argument("--method", choices=[m.value for m in Method], default=d.method.value,
                    help="learning method (default: %(default)s)")
    tr.add_argument("--init", choices=[i.value for i in Init], default=d.init.value,
                    help="where LinEAS starts: identity maps, or the closed-form Linear-AcT maps (then the result is "
                         "never worse than Linear-AcT on the training W2: if LinEAS ends worse, the Linear-AcT maps "
                         "are written) (default: %(default)s)")
    tr.add_argument("--steps", type=int, default=d.steps, help="LinEAS optimiser steps (default: %(default)s)")
    tr.add_argument("--optimizer", choices=[o.value for o in Optimizer], default=d.optimizer.value,
                    help="LinEAS optimiser (default: %(default)s)")
    tr.add_argument("--lr", type=float, default=d.lr, help="LinEAS learning rate (default: %(default)s)")
    tr.add_argument("--betas", type=float, nargs=2, default=d.betas, metavar=("B1", "B2"),
                    help="Adam betas (default: %(default)s, ml-lineas uses 0.9 0.9)")
    tr.add_argument("--schedule", choices=[c.value for c in Schedule], default=d.schedule.value,
                    help="learning-rate schedule; cosine anneals to 0 over --steps (default: %(default)s)")
    tr.add_argument("--batch-size", type=int, default=d.batch_size,
                    help="source prompts per LinEAS step, and batch size for activation collection "
                         "(default: %(default)s)")
    tr.add_argument("--max-length", type=int, default=d.max_length,
                    help="truncate prompts to this many tokens (default: %(default)s)")
    tr.add_argument("--sparsity-l1", type=float, default=d.sparsity_l1, metavar="X",
                    help="LinEAS: L1 weight of the sparse-group-lasso proximal step on (scale-1, shift) "
                         "(default: %(default)s)")
    tr.add_argument("--sparsity-group", type=float, default=d.sparsity_group, metavar="X",
                    help="LinEAS: group-L2 weight (per site and parameter) of the proximal step (default: %(default)s)")
    tr.add_argument("--foldable", nargs="?", const=Foldable.ON.value, choices=[f.value for f in Foldable],
                    default=d.foldable.value, metavar="{auto,on,off}",
                    help="train only what lineas-bake can fold into standard weights: the bake planner (same "
                         "registry, bake/registry/archs) says, per site, whether its scale and its shift fold; a part "
                         "that would need an affine module stays at scale 1 / shift 0 (also for Linear-AcT and --init "
                         "linear-act), a site where nothing folds is left out, and the maps then bake with "
                         "lineas-bake --require-standard. 'auto' (default): on when a registry entry describes the "
                         "model; '--foldable' alone: on; 'off': train every part (the bake may need affine modules "
                         "and trust_remote_code) (default: %(default)s)")
    tr.add_argument("--require-runtime", action="append", default=[], metavar="NAME",
                    help="keep the maps servable by NAME without custom code, as lineas-bake --require-runtime "
                         "checks (llama.cpp, vllm, tgi, transformers, onnxruntime; repeatable): a shift whose fold "
                         "switches on a bias flag NAME does not load (Gemma-2's attention_bias in llama.cpp) is "
                         "frozen at 0 too. Needs --foldable (auto or on)")
    tr.add_argument("--holdout", type=float, default=d.holdout, metavar="FRAC",
                    help="hold out this fraction of source and target prompts and report W2 on them too "
                         "(default: %(default)s)")
    tr.add_argument("--seed", type=int, default=d.seed, help="seed for batching and splits (default: %(default)s)")

    from lineas.learn.pipeline_collect import DEFAULT_SITES, DenoiseSchedule

    t2i = p.add_argument_group(
        "text-to-image pipelines (--model is a diffusers pipeline folder with model_index.json)",
        "Sites are <component>.<module path> in the denoiser. Default --sites: "
        + "; ".join(f"{k}: {' '.join(v)}" for k, v in DEFAULT_SITES.items())
        + ". Activations are pooled over HxW or tokens, then averaged over the denoising steps.")
    t2i.add_argument("--denoising-steps", type=int, default=None, metavar="N",
                     help=f"denoising steps per prompt while collecting (1-4 for distilled models; default: "
                          f"{DenoiseSchedule.steps})")
    t2i.add_argument("--guidance-scale", type=float, default=None, metavar="X",
                     help="classifier-free guidance scale while collecting (default: the pipeline's own)")
    t2i.add_argument("--image-size", type=int, default=None, metavar="PX",
                     help="image height and width while collecting (default: the pipeline's own)")

    rt = p.add_argument_group("runtime")
    rt.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    rt.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model weight dtype; maps are always trained and stored in float32 (default: float32)")
    rt.add_argument("--quiet", action="store_true", help="no progress bars")
    rt.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an error")
    rt.add_argument("--report-json", metavar="FILE", help="also write the per-site W2 report as JSON")

    danger = p.add_argument_group("dangerous options")
    danger.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the model (only for models you trust)")
    return p


def build_import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lineas-train import-mlact",
        description="Convert apple/ml-act or apple/ml-lineas saved hooks into a lineas-maps file.\n\n"
                    "PATH is a '<module>[:idx].statedict' file or a folder of them; each holds net.w1 and net.b1\n"
                    "of shape (1, D), the affine map y -> w1*y + b1 of that module's output.  Files are read with\n"
                    "torch.load(weights_only=True): nothing is unpickled beyond tensors and plain containers.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="a .statedict file or a folder of them")
    p.add_argument("--out", required=True, metavar="maps.safetensors", help="output maps file")
    p.add_argument("--base-model", default="", help="record this model name in the metadata")
    p.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an error")
    danger = p.add_argument_group("dangerous options")
    danger.add_argument("--ignore-quantile-gate", action="store_true",
                        help="import Linear-AcT hooks fitted with quantiles_src other than q_all anyway; they only "
                             "transported activations inside a quantile range, so the imported affine map is NOT "
                             "the same intervention")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lineas-train`` under the one top-level handler (:func:`bake.cli.handler.guarded`): a known error is one
    line and exit 2, an unknown one exit 1 with "please report this" (``-v``: its traceback), Ctrl-C 130 and
    SIGTERM 143 unless the maps file was already written."""
    from bake.cli.handler import Output, guarded, train_bad_input, wants_traceback

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    output, known = Output(kind="maps file"), train_bad_input()
    if argv and argv[0] == "import-mlact":
        return guarded("lineas-train import-mlact", lambda: _import_mlact(argv[1:], output),
                       verbose=wants_traceback(argv), output=output, extra_bad_input=known)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    output.claim(args.out)
    return guarded("lineas-train", lambda: _train(args), verbose=args.verbose, output=output, extra_bad_input=known)


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    return fail("lineas-train", msg, code)


def train_config(args):
    """The ``TrainConfig`` of parsed arguments; a ``ConfigError`` when out of range (its own checks), or for a
    ``--require-runtime`` the bake does not know (:func:`bake.plan.foldable.runtime_names`, which also spells
    the names as the bake does: ``llamacpp`` -> ``llama.cpp``)."""
    from dataclasses import replace

    from bake.plan.foldable import runtime_names
    from lineas.learn.config import TrainConfig

    config = TrainConfig(method=args.method, init=args.init, steps=args.steps, optimizer=args.optimizer, lr=args.lr,
                         betas=tuple(args.betas), schedule=args.schedule, batch_size=args.batch_size,
                         max_length=args.max_length, sparsity_l1=args.sparsity_l1,
                         sparsity_group=args.sparsity_group, seed=args.seed, holdout=args.holdout,
                         foldable=args.foldable)
    return replace(config, runtimes=runtime_names(args.require_runtime))  # checked again, with the runtimes


def _train(args) -> int:
    from bake.plan.foldable import FOLD_PLANNER
    from lineas.collect import SiteMatchError, check_distinguishable, match_sites
    from lineas.hooks import SteeringError
    from lineas.learn.config import ConfigError
    from lineas.learn.train import learn_maps
    from lineas.models import ModelLoadError, display_name, load_model
    from lineas.prompts import PromptError, load_prompts
    from lineas.train_out import check_train_outputs

    try:
        config = train_config(args)
    except ConfigError as e:
        return _fail(e.for_flag())
    try:
        check_train_outputs(args.out, args.report_json, overwrite=args.overwrite, model=args.model,
                            prompts=(args.source, args.target))  # lineas.train_out: also checked again below
        source = load_prompts(args.source)
        target = load_prompts(args.target)
    except (PromptError, ValueError) as e:
        return _fail(str(e))
    from lineas.pipelines import is_pipeline_folder

    pipeline_flags = [f for f, v in (("--denoising-steps", args.denoising_steps), ("--guidance-scale",
                      args.guidance_scale), ("--image-size", args.image_size)) if v is not None]
    if is_pipeline_folder(args.model):
        return _train_pipeline(args, config, source, target)
    if pipeline_flags:
        return _fail(f"{', '.join(pipeline_flags)} only apply to a diffusers pipeline folder; {args.model!r} has no "
                     f"model_index.json")
    if not args.sites:
        return _fail(f"--sites is required for a causal LM such as {args.model!r} (a regex over its module names)")
    try:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype,
                            trust_remote_code=args.trust_remote_code)
    except ModelLoadError as e:
        return _fail(str(e))
    except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device that is not there
        return _fail(f"cannot put model on device {args.device!r}: {e}")
    if loaded.tokenizer is None:
        return _fail(f"model {args.model!r} has no tokenizer; text prompts cannot be encoded")
    try:
        check_train_outputs(args.out, args.report_json, overwrite=args.overwrite, model=loaded.path,
                            prompts=(args.source, args.target))  # a Hub id's cached blobs are inputs too
        check_distinguishable(loaded.tokenizer, source, target, config.max_length)  # lineas.collect
    except ValueError as e:
        return _fail(str(e))
    try:
        sites = match_sites(loaded.model, args.sites)
    except SiteMatchError as e:
        return _fail(str(e))
    log.info("%d site(s): %s", len(sites), ", ".join(sites[:4]) + (" ..." if len(sites) > 4 else ""))
    try:
        result = learn_maps(
            loaded.model, loaded.tokenizer, source.texts, target.texts, sites, config, progress=not args.quiet,
            base_model=display_name(args.model), source_desc=source.description, target_desc=target.description,
            source_sha256=source.sha256, target_sha256=target.sha256, planner=FOLD_PLANNER)
    except (SteeringError, ValueError) as e:
        return _fail(str(e))
    except FloatingPointError as e:
        return _fail(str(e), EXIT_FAIL)
    return _finish(args, result)


def _train_pipeline(args, config, source, target) -> int:
    """``--model`` is a diffusers pipeline folder: learn at its denoiser's sites (lineas.learn.pipeline_collect)."""
    import torch

    from bake.plan.foldable import FOLD_PLANNER
    from lineas.collect import SiteMatchError
    from lineas.hooks import SteeringError
    from lineas.learn.pipeline_collect import DenoiseSchedule, learn_pipeline_maps
    from lineas.models import display_name
    from lineas.pipelines import PipelineLoadError, load_pipeline

    try:
        steps = DenoiseSchedule.steps if args.denoising_steps is None else args.denoising_steps
        schedule = DenoiseSchedule(steps=steps,
                                   guidance_scale=args.guidance_scale, height=args.image_size, width=args.image_size,
                                   seed=args.seed)
    except ValueError as e:
        return _fail(str(e))
    try:
        pipe = load_pipeline(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                             trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    except PipelineLoadError as e:
        return _fail(str(e))
    except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device that is not there
        return _fail(f"cannot put pipeline on device {args.device!r}: {e}")
    try:
        result = learn_pipeline_maps(
            pipe, source.texts, target.texts, args.sites, config, schedule=schedule, progress=not args.quiet,
            base_model=display_name(args.model), source_desc=source.description, target_desc=target.description,
            source_sha256=source.sha256, target_sha256=target.sha256, planner=FOLD_PLANNER)
    except (PipelineLoadError, SiteMatchError, SteeringError, ValueError) as e:
        return _fail(str(e))
    except FloatingPointError as e:
        return _fail(str(e), EXIT_FAIL)
    return _finish(args, result)


def _finish(args, result) -> int:
    """Write the maps (and the JSON report) and print the per-site table."""
    from lineas.train_out import write_new

    try:
        out = write_new(args.out, result.maps.save, overwrite=args.overwrite)
        if args.report_json:
            _write_report(args.report_json, result, overwrite=args.overwrite)
    except FileExistsError as e:
        return _fail(f"{e.filename!r} was created by something else while training ran; it was not replaced "
                     "(pass --overwrite to replace it)")
    print(result.table())
    if result.fell_back_to_linear_act:
        print("--init linear-act: LinEAS ended with a higher training W2 than its Linear-AcT start; "
              "wrote the Linear-AcT maps")
    print(result.foldable.summary())
    print(f"wrote {len(result.maps)} site map(s) to {out} ({result.seconds:.1f} s)")
    return EXIT_OK


def _write_report(path: str, result, *, overwrite: bool = False) -> None:
    from dataclasses import asdict

    data = {"support": result.support, "sites": [asdict(r) for r in result.report], "losses": list(result.losses),
            "seconds": result.seconds, "config": json.loads(result.config.to_json()),
            "fell_back_to_linear_act": result.fell_back_to_linear_act,
            "foldable": result.foldable.to_dict() if result.foldable is not None else None}
    from lineas.train_out import write_new

    write_new(path, lambda tmp: atomic_write_text(tmp, json.dumps(data, indent=2)), overwrite=overwrite)


def _import_mlact(argv: list[str], output=None) -> int:
    from lineas.learn.mlact import MlActImportError, import_mlact
    from lineas.maps import MapsFormatError

    try:
        args = build_import_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if output is not None:  # for an interrupt: was the maps file written (bake.cli.handler.Output)?
        output.claim(args.out)
    if args.ignore_quantile_gate:
        log.warning("!!! --ignore-quantile-gate: hooks fitted with a quantile gate (quantiles_src != q_all) will be "
                    "imported as plain affine maps. They transported only activations inside a quantile range; "
                    "the imported maps steer EVERY activation and are a DIFFERENT intervention. !!!")
    try:
        maps = import_mlact(args.path, ignore_quantile_gate=args.ignore_quantile_gate, base_model=args.base_model)
    except (MlActImportError, MapsFormatError) as e:
        return _fail(str(e))
    out = maps.save(args.out)
    print(f"imported {len(maps)} site map(s) from {args.path} to {out}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
