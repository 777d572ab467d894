"""How ``lineas-bake`` scales with the model: wall time and peak RSS on random full-size checkpoints,
against a warm ``cp -r`` of the same folder measured in the same run (issue 9, "Benchmark").

    python benchmarks/bake_scale.py --workdir /work/bench-data                    # gemma2-2b, llama3-8b
    python benchmarks/bake_scale.py --shapes tiny-gemma2,tiny-llama --workdir /tmp/bs   # seconds, for testing
    python benchmarks/bake_scale.py --shapes gemma2-2b --dtype bfloat16 -- --verify-tokens 4

For each shape (``benchmarks/random_checkpoint.py``; ``gemma2-2b``: the real Gemma-2-2B config, 3 bf16
shards, tied embeddings; ``llama3-8b``: the real Llama-3-8B config, 4 bf16 shards, ~16 GB):

1. the random checkpoint ``<workdir>/<shape>/`` is generated, or reused when it is already there and
   valid (so reruns are cheap);
2. a lineas-maps file ``<workdir>/<shape>.maps.safetensors`` is written with a map on every layer at
   sites that fold without affine modules (``MAP_SITES``): scale ~ U(0.95, 1.05), shift ~ U(-0.05, 0.05)
   (0 on scale-only sites);
3. ``cp -r`` of the checkpoint runs once to warm the page cache, then a second ``cp -r`` is timed; both
   copies are deleted at once;
4. ``lineas-bake --model <workdir>/<shape> --maps <maps> --out <workdir>/<shape>-baked --dtype D
   --require-standard [extra args after --]`` runs as a child process; its wall time and its peak RSS
   (``ru_maxrss`` from ``os.wait4``, exact, including any process it waited for) are measured; its stdout
   and stderr are kept in ``<workdir>/<shape>-bake.{stdout,stderr}``; the export is deleted unless --keep.

Free disk space is checked before anything is written; a run that cannot fit is refused (exit 2).
A bake that fails is recorded (exit code, stderr tail) and the next shape still runs.

Output: one JSON object per shape as it finishes, then a JSON list of all of them.  Fields:
  shape               the shape's name (``random_checkpoint.SHAPES``)
  model_type          config.json's model_type
  params              weights in the checkpoint (tied embeddings counted once)
  layers              decoder layers (each carries maps)
  map_sites           sites in the maps file
  checkpoint_bytes    size of the checkpoint folder's files
  shards              safetensors shard files
  generated_s         seconds it took to generate the checkpoint in this run; null when reused
  export_dtype        --dtype of the bake (per-shape default in DEFAULT_EXPORT_DTYPE, or --dtype)
  cp_wall_s           wall seconds of the timed (second, warm) ``cp -r`` of the checkpoint folder
  bake_wall_s         wall seconds of the lineas-bake process, start to exit
  bake_peak_rss_gib   peak resident memory of the lineas-bake process, GiB (2^30 bytes)
  ratio_to_cp         bake_wall_s / cp_wall_s
  export_bytes        size of the export folder's files; null when the bake failed
  exit_code           lineas-bake's exit status (0 ok, 2 bad input, 3 verification failed, ...)
  stderr_tail         last lines of lineas-bake's stderr, only when exit_code != 0
  command             the lineas-bake command line that ran
  cpus, ram_gib       this machine's logical CPUs and total memory
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from random_checkpoint import SHAPES, ensure, layout  # noqa: E402

# Export dtype per shape.  float32 for the full-size shapes: the exact fp32 check is then the export
# itself; a bfloat16 export also writes a float32 scratch copy to check the fold on (bake.formats.export), which
# for the 8B (16 GB source + 32 GB scratch + 16 GB export) does not fit this machine's disk.
DEFAULT_EXPORT_DTYPE = {"gemma2-2b": "float32", "llama3-8b": "float32",
                        "tiny-gemma2": "float32", "tiny-llama": "bfloat16"}
EXPORT_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
DISK_MARGIN_BYTES = 2 << 30
MAP_MAGNITUDE = 0.05
STDERR_TAIL_LINES = 30


@dataclass(frozen=True)
class MapSite:
    """A per-layer site ``model.layers.{i}.<suffix>``; ``shifted=False`` means scale only (shift 0)."""

    suffix: str
    shifted: bool


# Sites that fold without affine modules (checked with `lineas-bake --dry-run` on the tiny shapes):
# Llama: both norms' shifts go into new q/k/v and gate/up biases (attention_bias, mlp_bias).
# Gemma-2: input_layernorm's shift goes into q/k/v biases; its MLP has no bias flag, so a shift on
# pre_feedforward_layernorm would need an affine module: scale only there.
MAP_SITES = {
    "llama": (MapSite(suffix="input_layernorm", shifted=True),
              MapSite(suffix="post_attention_layernorm", shifted=True)),
    "gemma2": (MapSite(suffix="input_layernorm", shifted=True),
               MapSite(suffix="pre_feedforward_layernorm", shifted=False)),
}


def write_maps(config, path: Path, seed: int = 0) -> int:
    """Random maps on every layer at ``MAP_SITES[config.model_type]``; returns the number of sites."""
    from lineas.maps import SiteMap, SteeringMaps

    try:
        kinds = MAP_SITES[config.model_type]
    except KeyError:
        raise ValueError(f"no map sites for model_type {config.model_type!r}; known: {sorted(MAP_SITES)}") from None
    g = torch.Generator().manual_seed(seed)
    d = config.hidden_size

    def uniform():
        return MAP_MAGNITUDE * (2 * torch.rand(d, generator=g) - 1)

    maps = {f"model.layers.{i}.{k.suffix}": SiteMap(1 + uniform(), uniform() if k.shifted else torch.zeros(d))
            for i in range(config.num_hidden_layers) for k in kinds}
    SteeringMaps(maps, {"method": "random", "source": "benchmarks/bake_scale.py", "target": "random"}).save(path)
    return len(maps)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed_warm_copy(src: Path, scratch: Path) -> float:
    """Seconds of a ``cp -r`` of ``src`` run right after an untimed one (page cache warm); the copies are
    deleted as soon as each finishes, and dirty pages are synced outside the timing."""
    for _warm_then_timed in (False, True):
        if scratch.exists():
            raise FileExistsError(f"{scratch} exists; delete it (a leftover copy of an interrupted run)")
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(scratch)], check=True)
        seconds = time.perf_counter() - start
        shutil.rmtree(scratch)
        os.sync()
    return seconds


def bake_command(model: Path, maps: Path, out: Path, dtype: str, extra: list[str]) -> list[str]:
    script = Path(sys.executable).with_name("lineas-bake")
    prog = [str(script)] if script.is_file() else [sys.executable, "-m", "bake.cli.main"]
    return [*prog, "--model", str(model), "--maps", str(maps), "--out", str(out), "--dtype", dtype,
            "--require-standard", *extra]


def run_measured(cmd: list[str], stdout: Path, stderr: Path) -> tuple[int, float, float]:
    """Run ``cmd`` with this repository first on PYTHONPATH; (exit code, wall s, peak RSS GiB)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen so it does not wait again
    return proc.returncode, wall, usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def check_disk(workdir: Path, names: list[str], dtypes: dict[str, str], keep: bool) -> None:
    """Refuse (ValueError) when the workdir's disk cannot hold the missing checkpoints plus the largest
    transient copy or export (all exports with --keep) and a margin."""
    missing, transient = 0, []
    for name in names:
        lay = layout(SHAPES[name])
        if not (workdir / name).exists():
            missing += lay.nbytes
        scratch = 0 if dtypes[name] == "float32" else lay.params * 4  # the fp32 copy the fold is checked on
        transient.append((lay.nbytes, lay.params * EXPORT_ITEMSIZE[dtypes[name]] + scratch))
    peak = (sum(e for _, e in transient) + max(c for c, _ in transient) if keep
            else max(max(pair) for pair in transient))
    need = missing + peak + DISK_MARGIN_BYTES
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise ValueError(f"{workdir} has {free / 2**30:.1f} GiB free, the run needs {need / 2**30:.1f} GiB "
                         f"({missing / 2**30:.1f} for new checkpoints, {peak / 2**30:.1f} for copies/exports, "
                         f"{DISK_MARGIN_BYTES / 2**30:.0f} margin); free space or use fewer --shapes")


def bench_shape(name: str, workdir: Path, dtype: str, extra: list[str], keep: bool, seed: int) -> dict:
    folder = workdir / name
    lay, generated_s = ensure(SHAPES[name], folder, seed)
    maps = workdir / f"{name}.maps.safetensors"
    sites = write_maps(lay.config, maps, seed)
    cp_s = timed_warm_copy(folder, workdir / f".{name}-cp-scratch")
    out = workdir / f"{name}-baked"
    if out.exists():  # an export kept by an earlier --keep run of this benchmark
        print(f"bake_scale: removing the earlier export {out}", file=sys.stderr)
        shutil.rmtree(out)
    cmd = bake_command(folder, maps, out, dtype, extra)
    stderr = workdir / f"{name}-bake.stderr"
    code, wall, rss = run_measured(cmd, workdir / f"{name}-bake.stdout", stderr)
    export = folder_bytes(out) if code == 0 and out.is_dir() else None
    if out.exists() and not keep:
        shutil.rmtree(out)
        os.sync()
    result = {"shape": name, "model_type": lay.config.model_type, "params": lay.params,
              "layers": lay.config.num_hidden_layers, "map_sites": sites, "checkpoint_bytes": folder_bytes(folder),
              "shards": len(lay.shards), "generated_s": None if generated_s is None else round(generated_s, 2),
              "export_dtype": dtype, "cp_wall_s": round(cp_s, 3), "bake_wall_s": round(wall, 2),
              "bake_peak_rss_gib": round(rss, 3), "ratio_to_cp": round(wall / cp_s, 2) if cp_s > 0 else None,
              "export_bytes": export, "exit_code": code}
    if code != 0:
        lines = stderr.read_text(errors="replace").splitlines()
        result["stderr_tail"] = "\n".join(lines[-STDERR_TAIL_LINES:])
    result["command"] = shlex.join(cmd)
    result["cpus"] = os.cpu_count()
    result["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return result


def parse_args(argv: list[str]):
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    from lineas.models import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="%(prog)s [options] [-- extra lineas-bake args]")
    ap.add_argument("--shapes", default="gemma2-2b,llama3-8b",
                    help=f"comma-separated, from {', '.join(SHAPES)} (default: gemma2-2b,llama3-8b)")
    ap.add_argument("--workdir", type=Path, default=cache_dir() / "bench-scale",
                    help="where checkpoints, maps, logs and exports go (default: %(default)s)")
    ap.add_argument("--dtype", choices=list(EXPORT_ITEMSIZE),
                    help="export dtype for every shape (default: per shape, " +
                         ", ".join(f"{k}={v}" for k, v in DEFAULT_EXPORT_DTYPE.items()) + ")")
    ap.add_argument("--keep", action="store_true", help="keep the exports in <workdir>/<shape>-baked")
    ap.add_argument("--seed", type=int, default=0, help="seed of the checkpoints and maps (default: 0)")
    args = ap.parse_args(own)
    args.extra = extra
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        ap.error(f"unknown --shapes {unknown or args.shapes}; choose from {', '.join(SHAPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    dtypes = {s: args.dtype or DEFAULT_EXPORT_DTYPE[s] for s in args.shapes}
    workdir = args.workdir.expanduser().absolute()
    try:
        check_disk(workdir, args.shapes, dtypes, args.keep)
    except ValueError as e:
        print(f"bake_scale: error: {e}", file=sys.stderr)
        return 2
    results = []
    for name in args.shapes:
        try:
            result = bench_shape(name, workdir, dtypes[name], args.extra, args.keep, args.seed)
        except (ValueError, OSError, subprocess.CalledProcessError) as e:  # e.g. a foreign folder at <workdir>/<shape>
            print(f"bake_scale: error: {name}: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result), flush=True)
        results.append(result)
    print(json.dumps(results))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
