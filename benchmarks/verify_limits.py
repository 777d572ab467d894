"""Where does fp32 rounding end and a wrong fold begin?  Measures, for random maps on every
foldable site, the baked-vs-hooked error next to candidate noise floors and wrong folds.

For each (magnitude a, seed): maps with scale ~ U(1-a, 1+a) and shift ~ U(-a, a) on every site;
the hooked reference is recorded as ``bake.bake`` records it, then

* ``baked``       -- the real fold (``plan`` + ``apply_plan``) compared with the reference;
* ``noise_floor`` -- what verification measures (bake.verify.noise_floor): the hooked model with every
                     map entry moved by one float32 ulp (random direction) against the reference;
* ``floor_batch`` -- the hooked model run one row at a time (a pure reassociation);
* ``floor_f64``   -- the hooked model in float64 compared with the fp32 reference;
* ``baked_vs_f64``-- the baked fp32 model compared with the float64 hooked reference;
* ``wrong_shift`` -- per tested site, a bake whose maps have that site's shift off by 1 %
                     (and ``wrong_scale``: the site's scale deviation s-1 off by 1 %);
* ``wrong_convention`` -- Gemma models only: (1 + w) norms folded as w.

Prints one JSON object per line.  Examples:
    python benchmarks/verify_limits.py --model tiny-llama --magnitudes 0.2
    python benchmarks/verify_limits.py --model smollm2-135m --magnitudes 0.05 0.2 --wrong-sites 6
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bake.fold.execute import apply_plan  # noqa: E402
from bake.plan.planner import plan  # noqa: E402
from bake.verify.check import compare, record_reference  # noqa: E402
from lineas.hooks import attach_affine, module_feature_dim  # noqa: E402
from lineas.maps import SiteMap  # noqa: E402

NORM_SUFFIXES = ("layernorm", "_norm", ".norm", "ln_1", "ln_2", "ln_f")
PRODUCER_SUFFIXES = ("mlp.down_proj", "self_attn.o_proj", "attn.c_proj", "mlp.c_proj")


def load(name: str):
    if name.startswith("tiny-"):
        from tiny import tiny_model

        return tiny_model(name[5:]), None
    from lineas.models import load_model

    loaded = load_model(name)
    return loaded.model, loaded.tokenizer


def foldable_sites(model, norms_only: bool) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    norms = [n for n in names if n.endswith(NORM_SUFFIXES) and "rotary" not in n]
    return norms if norms_only else norms + [n for n in names if n.endswith(PRODUCER_SUFFIXES)]


def random_maps(model, sites, a: float, seed: int) -> dict[str, SiteMap]:
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for s in sites:
        d = module_feature_dim(mods[s])
        u, v = torch.rand(d, generator=g), torch.rand(d, generator=g)
        out[s] = SiteMap(1 + a * (2 * u - 1), a * (2 * v - 1))
    return out


def baked_check(model, eff, ref, label):
    m = copy.deepcopy(model)
    apply_plan(m, plan(m, eff, untie=True), eff)
    check, _ = compare(m, ref, "torch-float32", label=label)
    return m, check


def row(check) -> dict:
    return {"max_rel": check.max_rel, "mean_kl": check.mean_kl, "top1": check.top1,
            "greedy": f"{check.greedy_matched}/{check.greedy_total}", "passed": check.passed,
            "limit": check.max_rel_limit}


@contextmanager
def _one_plus_w_folded_as_w():
    """Gemma's ``(1 + w)`` norms folded as if they were ``w``: the classic convention bug."""
    from bake.core import fold_math as fold
    from bake.fold import execute

    real = execute.fold_norm_scale
    execute.fold_norm_scale = lambda weight, scale, one_plus=False: fold.fold_norm_scale(weight, scale)
    try:
        yield
    finally:
        execute.fold_norm_scale = real


def rowwise(model):
    @torch.no_grad()
    def run(ids, mask):
        return torch.cat([model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], use_cache=False)
                          .logits.float() for i in range(ids.shape[0])])
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--magnitudes", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--norms-only", action="store_true", help="steer only norm sites (SmolLM2: all 60)")
    ap.add_argument("--wrong-sites", type=int, default=4, help="sites (evenly spaced) to fold wrongly, 0: none")
    ap.add_argument("--f64", action="store_true", help="also compare with a float64 hooked reference")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    sites = foldable_sites(model, args.norms_only)
    for a in args.magnitudes:
        for seed in args.seeds:
            eff = random_maps(model, sites, a, seed)
            aff = {s: (m.scale, m.shift) for s, m in eff.items()}
            ref = record_reference(model, aff, tokenizer=tok, n_tokens=8)
            out = {"model": args.model, "sites": len(sites), "magnitude": a, "seed": seed,
                   "noise_floor": ref.noise_floor.to_dict()}
            baked, check = baked_check(model, eff, ref, "baked")
            out["baked"] = row(check)
            with attach_affine(model, aff):
                out["floor_batch"] = row(compare(rowwise(model), ref, "torch-float32", label="rowwise")[0])
            if args.f64:
                m64 = copy.deepcopy(model).double()
                with attach_affine(m64, {s: (x.double(), y.double()) for s, (x, y) in aff.items()}):
                    out["floor_f64"] = row(compare(m64, ref, "torch-float32", label="f64")[0])
                    ref64 = record_reference(m64, {}, tokenizer=tok, n_tokens=8, noise_floor=False)
                out["baked_vs_f64"] = row(compare(baked, ref64, "torch-float32", label="baked-vs-f64")[0])
                with attach_affine(model, aff):
                    out["hooked_vs_f64"] = row(compare(model, ref64, "torch-float32", label="hooked-vs-f64")[0])
                del m64
            del baked
            n = args.wrong_sites
            picks = [sites[round(i * (len(sites) - 1) / max(n - 1, 1))] for i in range(n)] if n else []
            for kind in ("shift", "scale"):
                errs = {}
                for s in picks:
                    m = eff[s]
                    bad = SiteMap(m.scale, m.shift * 1.01) if kind == "shift" else SiteMap(1 + (m.scale - 1) * 1.01,
                                                                                           m.shift)
                    _, check = baked_check(model, {**eff, s: bad}, ref, f"wrong {kind} {s}")
                    errs[s] = row(check)
                out[f"wrong_{kind}"] = errs
            if any(type(m).__name__.startswith("Gemma") for m in model.modules()):
                with _one_plus_w_folded_as_w():
                    out["wrong_convention"] = row(baked_check(model, eff, ref, "1+w as w")[1])
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
