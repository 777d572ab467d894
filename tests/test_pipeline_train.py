"""lineas-train on diffusers pipelines (lineas/learn/pipeline_collect.py): collection, learning, CLI, bad inputs."""

import json
import re

import pytest
import torch

pytest.importorskip("diffusers")

from lineas.axis import feature_axis, pool_features  # noqa: E402
from lineas.cli import main  # noqa: E402
from lineas.collect import run_to_sites  # noqa: E402
from lineas.hooks import attach_maps, count_forward_hooks, resolve_sites  # noqa: E402
from lineas.learn.pipeline_collect import DEFAULT_SITES, DenoiseSchedule, PipelineRunner, PromptSeedBatch  # noqa: E402
from lineas.maps import SteeringMaps  # noqa: E402
from lineas.pipelines import PIPELINE_CLASS_KEY, PipelineLoadError, load_pipeline, pipeline_modules  # noqa: E402
from lineas.prompts import load_prompts  # noqa: E402

SITE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.norm3"  # LayerNorm, [B, HW, 64]
GROUPNORM_SITE = "unet.up_blocks.0.resnets.1.norm1"  # GroupNorm [B, C, H, W], after a cross-attention


def test_pool_calls_keep_the_conditional_half_and_average_the_steps():
    batch = PromptSeedBatch(prompts=("a", "b"), seeds=(0, 1), calls_per_site=2)
    uncond, cond1, cond2 = torch.full((2, 3), 100.0), torch.tensor([[1.0] * 3, [2.0] * 3]), torch.tensor(
        [[3.0] * 3, [6.0] * 3])
    got = batch.pool_calls("s", [torch.cat([uncond, cond1]), torch.cat([uncond, cond2])])
    assert torch.equal(got, torch.tensor([[2.0] * 3, [4.0] * 3]))
    assert torch.equal(batch.pool_calls("s", [cond1, cond2]), got)  # no CFG: every row is conditional
    with pytest.raises(ValueError, match="3 rows for 2 prompts"):
        batch.pool_calls("s", [torch.zeros(3, 3)])


@pytest.mark.parametrize("site", [SITE, GROUPNORM_SITE])
def test_runner_pools_each_step_of_the_real_pipeline_call(site, tiny_pipeline_folder):
    """run_to_sites on the runner == a plain hook on the pipeline's own call: pool_features per step
    (HxW for 4-D, tokens for 3-D), the conditional half of the CFG batch, the mean over steps."""
    pipe = load_pipeline(tiny_pipeline_folder("sd"))
    runner = PipelineRunner(pipe, DenoiseSchedule(steps=2, guidance_scale=5.0, height=16, width=16, seed=3))
    batch = runner.encode(["a photo of a cat", "a photo of a dog"]).batch([0, 1])
    with torch.no_grad():
        got = run_to_sites(runner, batch, [site])[site]
    module = resolve_sites(pipeline_modules(pipe), [site])[site]
    calls = []
    handle = module.register_forward_hook(lambda m, i, o: calls.append(pool_features(o, feature_axis(m, o.dim()))))
    try:
        pipe(**runner.call_kwargs(batch))
    finally:
        handle.remove()
    assert len(calls) == 2 and all(c.shape[0] == 4 for c in calls)  # 2 steps, CFG doubles the 2 prompts
    assert not torch.allclose(calls[0][2:], calls[1][2:])  # the steps differ: averaging them is not a no-op
    assert not torch.allclose(calls[0][:2], calls[0][2:])  # the halves differ: picking one matters
    assert torch.allclose(got, (calls[0][2:] + calls[1][2:]) / 2, atol=1e-6)


def _prompt_files(tmp_path, n=4):
    src, tgt = tmp_path / "photo.txt", tmp_path / "anime.txt"
    src.write_text("\n".join(load_prompts("photo").texts[:n]))
    tgt.write_text("\n".join(load_prompts("anime").texts[:n]))
    return src, tgt


def _train_args(folder, src, tgt, out, *extra):
    return ["--model", str(folder), "--source", str(src), "--target", str(tgt), "--out", str(out), "--quiet",
            "--denoising-steps", "2", "--image-size", "16", "--guidance-scale", "1", *extra]


@pytest.mark.parametrize("method", ["lineas", "linear-act"])
def test_cli_learns_maps_on_a_tiny_sd_pipeline(method, tiny_pipeline_folder, tmp_path, capsys):
    folder = tiny_pipeline_folder("sd")
    src, tgt = _prompt_files(tmp_path)
    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    assert main(_train_args(folder, src, tgt, out, "--method", method, "--steps", "8", "--lr", "0.02",
                            "--report-json", str(report))) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads(report.read_text())
    before = sum(r["w2_before"] for r in data["sites"]) / len(data["sites"])
    after = sum(r["w2_after"] for r in data["sites"]) / len(data["sites"])
    assert after < 0.5 * before, (before, after)  # measured: -83% (LinEAS, 10 steps), -99% (Linear-AcT)
    if method == "lineas":
        assert data["losses"][-1] < 0.5 * data["losses"][0]

    maps = SteeringMaps.load(out)
    meta = maps.metadata
    assert meta[PIPELINE_CLASS_KEY] == "StableDiffusionPipeline" and meta["denoiser"] == "unet"
    assert meta["method"] == method and meta["denoising_steps"] == "2"
    pipe = load_pipeline(folder)
    names = [n for n, _ in pipeline_modules(pipe).named_modules()]
    expected = [n for n in names if any(re.fullmatch(rx, n) for rx in DEFAULT_SITES["unet"])]
    assert len(expected) == 18 and sorted(json.loads(meta["sites"])) == sorted(expected) == sorted(maps.sites)

    # the maps hook into the pipeline and change its image
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2, height=16, width=16, output_type="np")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    mods = pipeline_modules(pipe)
    with attach_maps(mods, maps, 1.0):
        assert count_forward_hooks(mods) == 18
        steered = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert count_forward_hooks(mods) == 0
    assert float(abs(steered - base).max()) > 1e-3

    # end to end: the learned maps bake (every site folds, the reload reproduces the hooked pipeline)
    from bake.cli.main import main as bake_main

    capsys.readouterr()
    assert bake_main(["--model", str(folder), "--maps", str(out), "--strength", "0.8", "--out",
                      str(tmp_path / "X")]) == 0, capsys.readouterr().err
    baked = capsys.readouterr().out
    assert "18 sites: 18 scales folded, 18 shifts folded into own bias, 0 affine modules" in baked
    assert json.loads((tmp_path / "X" / "lineas_verification.json").read_text())["passed"]


def test_bad_inputs_name_the_offender_and_write_nothing(tiny_pipeline_folder, tmp_path, capsys):
    folder = tiny_pipeline_folder("sd")
    src, tgt = _prompt_files(tmp_path, n=2)
    out = tmp_path / "m.safetensors"

    def fails(args, *needles):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err
        assert not out.exists()

    fails(_train_args(folder, src, tgt, out, "--sites", "unet.down_blocks.9.norm"),
          "'unet.down_blocks.9.norm' matches no module", "similar names: unet.down_blocks.1")
    # the text encoder's module path differs by transformers major (text_encoder.text_model.* on 4.x)
    encoder_norm = next(n for n, _ in pipeline_modules(load_pipeline(folder)).named_modules()
                        if n.startswith("text_encoder.") and n.endswith("final_layer_norm"))
    fails(_train_args(folder, src, tgt, out, "--sites", re.escape(encoder_norm)), encoder_norm,
          "not in the denoiser 'unet'")
    fails(_train_args(folder, src, tgt, out, "--denoising-steps", "0"), "--denoising-steps", "got 0")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchDreamPipeline"}))
    fails(_train_args(unknown, src, tgt, out), "NoSuchDreamPipeline")
    llm = ["--model", str(tmp_path / "no-model"), "--source", str(src), "--target", str(tgt), "--out", str(out)]
    fails(llm, "--sites is required")
    fails([*llm, "--sites", "x", "--denoising-steps", "2"], "--denoising-steps only apply to a diffusers pipeline")


def test_a_pipeline_without_a_denoiser_is_refused():
    class NoDenoiser:
        components = {"text_encoder": torch.nn.Linear(2, 2), "tokenizer": object()}

    with pytest.raises(PipelineLoadError, match="no denoiser among the components"):
        PipelineRunner(NoDenoiser(), DenoiseSchedule())


def test_builtin_text_to_image_sets_are_line_by_line_pairs():
    photo, anime = load_prompts("photo").texts, load_prompts("anime").texts
    assert len(photo) == len(anime) >= 24
    assert all(p.replace("a photo of ", "an anime drawing of ", 1) == a for p, a in zip(photo, anime))
    scenes, elephant = load_prompts("scenes").texts, load_prompts("pink_elephant").texts
    assert len(scenes) == len(elephant) >= 24
    assert all(e == s + ", with a pink elephant" for s, e in zip(scenes, elephant))
    assert not any("elephant" in s for s in scenes)


@pytest.mark.parametrize("kind,expected", [
    ("sd3", ["transformer.transformer_blocks.0.norm1", "transformer.transformer_blocks.0.norm1_context",
             "transformer.transformer_blocks.1.norm1", "transformer.transformer_blocks.1.norm1_context"]),
    ("flux", ["transformer.transformer_blocks.0.norm1", "transformer.transformer_blocks.0.norm1_context",
              "transformer.single_transformer_blocks.0.norm"])])
def test_transformer_pipelines_learn_at_their_adaln_norms(kind, expected, tiny_pipeline_folder):
    """SD3 (CFG batches) and FLUX (packed latent tokens, no CFG): the default sites are the AdaLN norms,
    whose tuple outputs are pooled on element 0, and Linear-AcT moves them towards the target."""
    from lineas.learn.pipeline_collect import learn_pipeline_maps

    pipe = load_pipeline(tiny_pipeline_folder(kind))
    src = list(load_prompts("photo").texts[:3])
    tgt = list(load_prompts("anime").texts[:3])
    result = learn_pipeline_maps(pipe, src, tgt, config=None, schedule=DenoiseSchedule(steps=2, height=32, width=32),
                                 progress=False, method="linear-act")
    assert sorted(result.maps.sites) == sorted(expected)
    assert result.maps.metadata["denoiser"] == "transformer" and result.w2_after < 0.5 * result.w2_before
    assert result.maps.metadata[PIPELINE_CLASS_KEY] == type(pipe).__name__


def test_foldable_freezes_what_the_pipeline_planner_cannot_fold(tiny_pipeline_folder):
    """The default --foldable auto asks the pipeline planner (bake.plan.diffusers), the one lineas-bake uses
    for pipelines: a per-head RMSNorm's shift has no bias to go into, so it stays at exactly 0 while its
    scale and the AdaLN norm's map are trained; the maps then plan with require_standard."""
    from bake.plan.diffusers import plan_pipeline
    from bake.plan.foldable import FOLD_PLANNER
    from lineas.learn.config import TrainConfig
    from lineas.learn.pipeline_collect import learn_pipeline_maps

    pipe = load_pipeline(tiny_pipeline_folder("flux"))
    qnorm, adaln = "transformer.transformer_blocks.0.attn.norm_q", "transformer.transformer_blocks.0.norm1"
    src, tgt = list(load_prompts("photo").texts[:3]), list(load_prompts("anime").texts[:3])
    result = learn_pipeline_maps(pipe, src, tgt, [qnorm, adaln], TrainConfig(steps=5, lr=0.02),
                                 schedule=DenoiseSchedule(steps=1, height=32, width=32), progress=False,
                                 planner=FOLD_PLANNER)  # as lineas-train plans
    maps = result.maps
    assert torch.equal(maps[qnorm].shift, torch.zeros_like(maps[qnorm].shift))
    assert not torch.equal(maps[qnorm].scale, torch.ones_like(maps[qnorm].scale))  # the foldable part moved
    assert not torch.equal(maps[adaln].shift, torch.zeros_like(maps[adaln].shift))
    record = json.loads(maps.metadata["foldable"])
    assert record["applied"] and record["registry"] == "diffusers" and list(record["frozen"]) == [qnorm]
    plan_pipeline(PipelineRunner(pipe, DenoiseSchedule()), maps.maps, require_standard=True)
