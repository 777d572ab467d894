"""Is the out-of-core engine slower on a small model?  ``lineas-bake`` on the embedded SmolLM2-135M
(random maps, scale ~ U(1-a, 1+a) and shift ~ U(-a, a), a = --magnitude, on all 60 input/post-attention norms;
HF float32 export), this tree against a baseline tree, alternating, in the same run.  Prints one JSON
object per tree: median wall seconds and peak RSS (GiB) of the lineas-bake process over ``--repeats``.

    git worktree add /tmp/base eaf27ff     # the in-memory engine, before issue 9
    python benchmarks/bake_speed_smollm2.py --baseline /tmp/base --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def write_maps(path: Path, magnitude: float) -> None:
    from bake_fixtures import uniform_maps

    from lineas.models import load_model

    model = load_model("smollm2-135m", with_tokenizer=False).model
    sites = [f"model.layers.{i}.{k}" for i in range(model.config.num_hidden_layers)
             for k in ("input_layernorm", "post_attention_layernorm")]
    uniform_maps(model, sites, magnitude, seed=0).save(path)


def run_once(tree: Path, maps: Path, out: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB, exit code) of one bake with ``tree`` first on the path.  Compare only
    runs that exit 0: a failed verification stops before the export is written and checked."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "bake.cli.main", "--model", "smollm2-135m", "--maps", str(maps), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tree)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return wall, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the baseline tree")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--magnitude", type=float, default=0.05, help="map magnitude a (default 0.05)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lineas-speed-"))
    try:
        maps = work / "maps.safetensors"
        write_maps(maps, args.magnitude)
        trees = {"this": ROOT, "baseline": args.baseline.resolve()}
        runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():  # alternate, so drift hits both alike
                runs[name].append(run_once(tree, maps, work / f"out-{name}"))
        for name, rs in runs.items():
            print(json.dumps({"tree": name, "path": str(trees[name]), "repeats": len(rs),
                              "wall_s_median": round(statistics.median(r[0] for r in rs), 2),
                              "wall_s": [round(r[0], 2) for r in rs],
                              "peak_rss_gib": round(max(r[1] for r in rs), 3),
                              "exit_codes": sorted({r[2] for r in rs})}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
