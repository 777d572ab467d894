"""Verification figures of pipeline bakes on the tiny test pipelines (the numbers in bake/verify/tolerances.py).

    PYTHONPATH=$PWD python benchmarks/pipeline_bake_figures.py sd sdxl sd3 flux

For each kind and two random map draws (scale 1 +- 0.3, shift N(0, 0.3), strength 0.8, on the sites of
tests/test_pipeline_bake.py) runs ``lineas-bake`` and prints the verification rows.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_pipeline_bake import SITES  # noqa: E402
from tiny_pipelines import random_maps, save_pipeline  # noqa: E402

from lineas.pipelines import load_pipeline  # noqa: E402


def main(kinds):
    work = Path(tempfile.mkdtemp(prefix="pipeline-figures-"))
    for kind in kinds:
        folder = save_pipeline(kind, work / kind)
        pipe = load_pipeline(folder)
        for seed in (1, 2):
            maps = work / f"{kind}-{seed}.safetensors"
            random_maps(pipe, SITES[kind], seed=seed).save(maps)
            r = subprocess.run([sys.executable, "-m", "bake.cli.main", "--model", str(folder), "--maps", str(maps),
                                "--strength", "0.8", "--out", str(work / f"{kind}-{seed}-out")],
                               capture_output=True, text=True)
            rows = [line for line in r.stdout.splitlines() if line.startswith(("denoiser", "image"))]
            print(f"{kind} draw {seed}: exit {r.returncode}", *rows, sep="\n  ")


if __name__ == "__main__":
    main(sys.argv[1:] or ["sd", "sdxl", "sd3", "flux"])
