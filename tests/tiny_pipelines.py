"""Tiny random diffusers pipelines, built from configs and saved as folders (no network).

As diffusers' own tests do: ``build_pipeline(kind)`` returns a float32 pipeline with random weights,
``save_pipeline(kind, dir)`` writes it with ``save_pipeline``.  Kinds:

* ``sd``   -- StableDiffusionPipeline, UNet ``block_out_channels=(32, 64)``, one CLIP text encoder;
* ``sdxl`` -- StableDiffusionXLPipeline, two CLIP text encoders built from SEPARATE config objects
  (a shared config breaks optimum's in-memory ONNX export);
* ``sd3``  -- StableDiffusion3Pipeline, SD3Transformer2DModel (AdaLayerNormZero/Continuous, RMS qk-norms);
* ``flux`` -- FluxPipeline, FluxTransformer2DModel (AdaLayerNormZero, ...Single, ...Continuous).

Both have a tiny T5 encoder whose slot gets the byte-level CLIP tokenizer (the pipelines only call
it; T5's sentencepiece model is not installable here).  A ``None`` T5 cannot be saved and reloaded
with a plain ``from_pretrained``.

The tokenizer is a local byte-level CLIP tokenizer: a ``vocab.json`` with the 256 byte symbols (and
their end-of-word forms) plus the two specials, an empty ``merges.txt``, ``model_max_length=77``.

Every norm weight/bias is randomised (and every all-zero parameter made non-zero), so a fold that gets
``1 + scale`` vs ``scale`` or the chunk order wrong cannot hide behind identity parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

KINDS = ("sd", "sdxl", "sd3", "flux")
MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte -> printable-unicode table (transformers 5 no longer exports ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return [chr(codes[b]) for b in sorted(codes, key=lambda b: (b not in printable, b if b in printable else codes[b]))]


def clip_tokenizer(folder: Path):
    """A byte-level CLIPTokenizer (no merges) saved under ``folder`` and loaded back."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH,
                         pad_token="<|endoftext|>")


VOCAB = 2 * 256 + 2


def _clip_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, hidden_size=32,
                          intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=VOCAB, max_position_embeddings=MAX_LENGTH, **extra)


def randomise_norms(module: torch.nn.Module, seed: int) -> None:
    """Non-identity norm parameters, and no all-zero parameter anywhere (zero-initialised output
    projections would make a wrong fold invisible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            kind = type(sub).__name__
            if not ("Norm" in kind and "Ada" not in kind):
                continue
            w, b = getattr(sub, "weight", None), getattr(sub, "bias", None)
            if isinstance(w, torch.Tensor) and w is not None:
                w.copy_(1.0 + 0.3 * torch.randn(w.shape, generator=g))
            if isinstance(b, torch.Tensor) and b is not None:
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
        for p in module.parameters():
            if not p.detach().abs().gt(0).any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, **extra)


def _sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8)
    vae = _vae(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8, sample_size=32)
    return lambda tok: StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(_clip_config()), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8)
    vae = _vae(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8, sample_size=32)
    # Two config objects on purpose (see the module docstring).
    enc1 = CLIPTextModel(_clip_config())
    enc2 = CLIPTextModelWithProjection(_clip_config(projection_dim=32))
    return lambda tok: StableDiffusionXLPipeline(
        vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1))


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                                        qk_norm="rms_norm")
    vae = _vae(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=32,
               use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    enc1 = CLIPTextModelWithProjection(_clip_config(projection_dim=32))
    enc2 = CLIPTextModelWithProjection(_clip_config(projection_dim=32))
    return lambda tok: StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, text_encoder=enc1, tokenizer=tok, text_encoder_2=enc2, tokenizer_2=tok,
        text_encoder_3=_t5(), tokenizer_3=tok, scheduler=FlowMatchEulerDiscreteScheduler())


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = _vae(block_out_channels=(8, 16), latent_channels=1, norm_num_groups=4, sample_size=32,
               use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return lambda tok: FluxPipeline(transformer=transformer, vae=vae, text_encoder=CLIPTextModel(_clip_config()),
                                    tokenizer=tok, text_encoder_2=_t5(), tokenizer_2=tok,
                                    scheduler=FlowMatchEulerDiscreteScheduler())


_BUILDERS = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}


def build_pipeline(kind: str, seed: int = 0, scratch: Path | None = None):
    """A float32 tiny pipeline of ``kind`` with random weights (``scratch``: where the tokenizer files go)."""
    import tempfile

    if kind not in _BUILDERS:
        raise ValueError(f"no tiny pipeline {kind!r}; choose one of {KINDS}")
    torch.manual_seed(seed)
    make = _BUILDERS[kind]()
    tok = clip_tokenizer(Path(scratch or tempfile.mkdtemp(prefix="tiny-tok-")) / "tokenizer")
    pipe = make(tok)
    for i, (_name, comp) in enumerate(sorted(pipe.components.items())):
        if isinstance(comp, torch.nn.Module):
            randomise_norms(comp, seed * 100 + i)
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    """Build the ``kind`` pipeline and ``save_pretrained`` it to ``folder`` (safetensors)."""
    folder = Path(folder)
    pipe = build_pipeline(kind, seed, scratch=folder.parent / f".{folder.name}-scratch")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def call_kwargs(kind: str, seed: int = 0, steps: int = 2) -> dict:
    """Arguments for a short, deterministic pipeline call on the tiny pipelines (32x32 images, CFG on)."""
    return dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=steps, height=32, width=32,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np",
                **({"max_sequence_length": 16} if kind in ("sd3", "flux") else {}),
                **({"true_cfg_scale": 4.0} if kind == "flux" else {}))


def site_dims(pipe, sites) -> dict[str, int]:
    """Each site's output feature size, measured by running the denoiser once (text-encoder sites: by type)."""
    from bake.families.diffusers.verify import denoiser_inputs
    from lineas.axis import resolve_axis
    from lineas.hooks import feature_axis, module_feature_dim, resolve_sites
    from lineas.pipelines import denoiser_name, pipeline_modules

    mods = resolve_sites(pipeline_modules(pipe), list(sites))
    dims = {s: module_feature_dim(m) for s, m in mods.items()}
    handles = []
    for s, m in mods.items():
        def hook(mod, _i, out, s=s):
            y = out[0] if isinstance(out, tuple) else out
            dims[s] = y.shape[resolve_axis(feature_axis(mod), y.dim())]
        handles.append(m.register_forward_hook(hook))
    den = pipe.components[denoiser_name(pipe)]
    try:
        with torch.no_grad():
            den(**denoiser_inputs(den), return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return dims


def random_maps(pipe, sites, seed: int = 0, spread: float = 0.3):
    """A lineas-maps object with random scale ~ 1 +- spread and shift ~ N(0, spread) on ``sites``,
    whose metadata names the pipeline class (lineas.pipelines.PIPELINE_CLASS_KEY)."""
    from lineas.maps import SiteMap, SteeringMaps
    from lineas.pipelines import PIPELINE_CLASS_KEY

    g = torch.Generator().manual_seed(seed)
    maps = {s: SiteMap(1 + spread * (2 * torch.rand(d, generator=g) - 1), spread * torch.randn(d, generator=g))
            for s, d in site_dims(pipe, sites).items()}
    return SteeringMaps(maps, {"method": "random", PIPELINE_CLASS_KEY: type(pipe).__name__})
