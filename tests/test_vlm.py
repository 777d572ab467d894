"""Vision-language models (issue 28): the language model's sites are baked with its text model's registry entry,
re-rooted under the VLM's text decoder (bake.registry.vlm); the vision tower and projector are left as they are.

Tiny random VLMs built from configs (no network), norm weights randomised: hooked != base, baked == hooked
(bake() in memory and bake_folder() out of core), the export reloads with AutoModelForImageTextToText without
remote code, every tensor outside the text decoder is identical to the source's, and an image+text probe built
offline with the model's processor answers as the hooked model does (Gemma-3 and LLaVA: the processors built
here; the other architectures' image probes are not written yet, see test_image_probe). The bake's own verification
runs such a probe too when the source folder has a processor (bake.verify.image_probe: row reload-image-text-float32,
failing on a corrupted export) and notes why not when it has none.
"""

from __future__ import annotations

import json

import pytest
import torch
from bake_fixtures import save_tokenizer

from bake import FoldError, bake, bake_folder
from bake.registry.vlm import text_decoder
from lineas.hooks import attach_maps
from lineas.maps import SiteMap, SteeringMaps

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
QWEN_VISION = dict(hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2)
# Token ids the tiny tokenizer gives the image tokens (tests/test_vlm.py: _tokenizer)
IMAGE, SOFT, BOI, EOI = 3, 4, 5, 6
ARCHS = ["gemma3", "llava", "idefics3", "mistral3", "qwen2_5_vl", "qwen3_vl"]
# Text models whose bias flags (or own biases) take the shift of input_layernorm: Mistral's have none
SHIFT_FOLDS = {"gemma3", "llava", "idefics3", "qwen2_5_vl", "qwen3_vl"}


def _config(arch: str):
    import transformers as tf

    if arch == "gemma3":
        return tf.Gemma3Config(text_config=dict(TEXT, head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
                               vision_config=SIGLIP, mm_tokens_per_image=4, image_token_index=SOFT,
                               boi_token_index=BOI, eoi_token_index=EOI)
    if arch == "llava":
        return tf.LlavaConfig(text_config=dict(TEXT, model_type="llama"), image_token_index=IMAGE,
                              vision_config=dict(SIGLIP, model_type="clip_vision_model", projection_dim=32))
    if arch == "mistral3":
        return tf.Mistral3Config(text_config=dict(TEXT, model_type="mistral", sliding_window=None, head_dim=16),
                                 vision_config=dict(SIGLIP, model_type="pixtral", head_dim=16),
                                 image_token_index=IMAGE, spatial_merge_size=2)
    if arch == "idefics3":
        return tf.Idefics3Config(text_config=dict(TEXT, model_type="llama"), vision_config=SIGLIP, scale_factor=2,
                                 image_token_id=IMAGE)
    if arch == "qwen2_5_vl":
        text = dict(TEXT, model_type="qwen2_5_vl_text", rope_scaling=dict(type="mrope", mrope_section=[2, 2, 4]))
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN_VISION, depth=1, window_size=8,
                                                                         fullatt_block_indexes=[0]),
                                   image_token_id=IMAGE, video_token_id=SOFT, vision_start_token_id=BOI)
    if arch == "qwen3_vl":
        rope = dict(rope_type="default", mrope_section=[2, 2, 4], mrope_interleaved=True)
        return tf.Qwen3VLConfig(text_config=dict(TEXT, head_dim=16, rope_scaling=rope),
                                vision_config=dict(QWEN_VISION, depth=2, deepstack_visual_indexes=[1],
                                                   num_position_embeddings=16),
                                image_token_id=IMAGE, video_token_id=SOFT, vision_start_token_id=BOI)
    raise ValueError(arch)


def tiny_vlm(arch: str, seed: int = 0):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(_config(arch), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # w=1 (or 0 for Gemma) would hide a wrong fold convention
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _maps(model, *, shift: bool, seed: int = 0) -> SteeringMaps:
    """Scale-only maps at a post-attention norm and a down projection; scale+shift (``shift``) at an input norm."""
    dec = text_decoder(model)
    g = torch.Generator().manual_seed(seed)

    def m(with_shift: bool) -> SiteMap:
        scale = 1 + 0.3 * torch.randn(64, generator=g)
        return SiteMap(scale, (0.3 if with_shift else 0.0) * torch.randn(64, generator=g))

    return SteeringMaps({f"{dec}.layers.0.post_attention_layernorm": m(False), f"{dec}.layers.1.input_layernorm":
                         m(shift), f"{dec}.layers.1.mlp.down_proj": m(False)}, {"method": "test"})


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(10, 128, (2, 12), generator=g)  # no image token ids


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _load(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def _source(arch, tmp_path):
    model = tiny_vlm(arch)
    src = tmp_path / f"tiny-{arch}"
    model.save_pretrained(src)
    save_tokenizer(src)
    return model, src


@pytest.mark.parametrize("out_of_core", [False, True], ids=["bake", "bake_folder"])
@pytest.mark.parametrize("arch", ARCHS)
def test_vlm_bakes_into_standard_checkpoint(arch, out_of_core, tmp_path):
    model, src = _source(arch, tmp_path)
    maps = _maps(model, shift=arch in SHIFT_FOLDS)
    ids = _ids()
    base = _logits(model, input_ids=ids)
    with attach_maps(model, maps, 1.0):
        hooked = _logits(model, input_ids=ids)
    assert _rel(hooked, base) > 1e-2, "the maps must change the output, or the test proves nothing"

    baked = (bake_folder if out_of_core else bake)(str(src), maps, require_standard=True)
    assert baked.plan.affine_sites == ()
    assert all(p.source.startswith("registry:") for p in baked.plan.sites), baked.plan.to_table()
    out = tmp_path / "out"
    baked.save_pretrained(out)  # verified against the hooked model (text probes), raises otherwise

    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config.get("architectures", [type(model).__name__]) == [type(model).__name__]
    reloaded = _load(out)  # no trust_remote_code
    assert type(reloaded) is type(model)
    assert _rel(_logits(reloaded, input_ids=ids), hooked) < 1e-5
    # The vision tower, the projector (and anything else outside the text decoder) are the source's, bit for bit.
    dec = text_decoder(model)
    got = dict(reloaded.named_parameters())
    outside = [n for n, _ in model.named_parameters() if not n.startswith(dec + ".") and n != "lm_head.weight"]
    assert any("vision" in n or "visual" in n for n in outside)
    for name, p in model.named_parameters():
        if name in outside:
            assert torch.equal(got[name], p), name
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "AutoModelForImageTextToText" in card


def test_vlm_shift_without_bias_is_refused_by_require_standard(tmp_path):
    """Mistral's text model has no bias to take a norm's shift: --require-standard names the site."""
    model, src = _source("mistral3", tmp_path)
    maps = _maps(model, shift=True)
    with pytest.raises(FoldError, match=r"model\.language_model\.layers\.1\.input_layernorm"):
        bake(str(src), maps, require_standard=True)


def test_vlm_plan_runtimes_and_flags():
    """The bias flag goes into the text config; no runtime but transformers is claimed for a VLM."""
    from bake.plan.planner import plan
    from lineas.maps import effective_maps

    model = tiny_vlm("llava")
    p = plan(model, effective_maps([(_maps(model, shift=True), 1.0)]))
    assert p.registry == "llama" and [c.key for c in p.config_changes] == ["attention_bias"]
    verdicts = {v.runtime.value: v.serves.value for v in p.runtimes}
    assert verdicts["transformers"] == "yes" and verdicts["llama.cpp"] == verdicts["vllm"] == "unknown"


# ----------------------------------------------------------------------------- the image+text probe
def _tokenizer(extra: dict | None = None):
    """A word-level tokenizer built offline, with the image tokens at the ids the tiny configs use."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "<image>": IMAGE, "<image_soft_token>": SOFT,
             "<start_of_image>": BOI, "<end_of_image>": EOI}
    for w in "describe this picture : a red square on white the sky is blue".split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in list(vocab)[3:7]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                   **(extra or {}))


def _processor(arch: str):
    """The model's processor built locally (image processor with tiny sizes + the tokenizer), or None."""
    import transformers as tf

    if arch == "gemma3":
        tok = _tokenizer({"extra_special_tokens": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                                   "eoi_token": "<end_of_image>"}})
        return tf.Gemma3Processor(image_processor=tf.Gemma3ImageProcessor(size={"height": 32, "width": 32}),
                                  tokenizer=tok, image_seq_length=4), "<start_of_image> describe this picture :"
    if arch == "llava":
        image = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return tf.LlavaProcessor(image_processor=image, tokenizer=_tokenizer(), patch_size=8,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1), \
            "<image> describe this picture :"
    return None, ""


@pytest.mark.parametrize("arch", ARCHS)
def test_image_probe(arch, tmp_path):
    """One image+text probe through the hooked source and the reloaded export, with the processor files the
    export copied from the source."""
    from PIL import Image
    from transformers import AutoProcessor

    processor, text = _processor(arch)
    if processor is None:
        pytest.skip(f"no offline processor is built for {arch} in this test yet: its image+text probe is not run "
                    "(its text probes are, in test_vlm_bakes_into_standard_checkpoint)")
    model, src = _source(arch, tmp_path)
    processor.save_pretrained(src)
    maps = _maps(model, shift=True)
    out = tmp_path / "out"
    bake(str(src), maps, require_standard=True).save_pretrained(out)
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (src / name).is_file():
            assert (out / name).read_bytes() == (src / name).read_bytes(), name

    image = Image.new("RGB", (40, 40), "white")
    image.paste((255, 0, 0), (8, 8, 28, 28))
    inputs = dict(AutoProcessor.from_pretrained(out)(text=text, images=image, return_tensors="pt"))
    assert "pixel_values" in inputs
    base = _logits(model, **inputs)
    with attach_maps(model, maps, 1.0):
        hooked = _logits(model, **inputs)
    assert _rel(hooked, base) > 1e-2
    got = _logits(_load(out), **inputs)
    assert _rel(got, hooked) < 1e-5
    assert torch.equal(got[:, -1].argmax(-1), hooked[:, -1].argmax(-1))


def test_text_decoder_and_registry_schema():
    """A text-only model has no text decoder to re-root; text_model_types is validated like the rest."""
    from tiny import tiny_model

    from bake.registry.llm import RegistryError, parse_entry

    assert text_decoder(tiny_model("llama")) is None
    assert text_decoder(tiny_vlm("idefics3")) == "model.text_model"
    from importlib import resources

    data = json.loads(resources.files("bake.registry").joinpath("archs/qwen2.json").read_text(encoding="utf-8"))
    assert parse_entry(data).text_model_types == {"qwen2_5_vl_text": {"Qwen2RMSNorm": "Qwen2_5_VLRMSNorm"}}
    with pytest.raises(RegistryError, match="text_model_types"):
        parse_entry(dict(data, text_model_types={"qwen2_5_vl_text": ["Qwen2RMSNorm"]}))


# ----------------------------------------------------------------------------- the bake's own image+text probe
IMAGE_ROW = "reload-image-text-float32"


def _image_checks(report):
    return [c for c in report.checks if c.tolerance.name == IMAGE_ROW]


def _source_with_processor(arch, tmp_path):
    processor, _ = _processor(arch)
    model, src = _source(arch, tmp_path)
    processor.save_pretrained(src)
    return model, src


@pytest.mark.parametrize(("out_of_core", "dtype"), [(False, "float32"), (False, "bfloat16"), (True, "float32"),
                                                    (True, "bfloat16")])
@pytest.mark.parametrize("arch", ["gemma3", "llava"])
def test_bake_verifies_the_image_probe(arch, out_of_core, dtype, tmp_path):
    """With a processor in the source folder, the export's verification runs one image+text probe (the source's
    processor, a generated image) through the hooked source and the written export: a gating row, passing, whose
    details show the maps move that probe far more than its limit (the check can fail)."""
    from bake.verify.tolerances import get_tolerance

    model, src = _source_with_processor(arch, tmp_path)
    baked = (bake_folder if out_of_core else bake)(str(src), _maps(model, shift=True), require_standard=True)
    out = baked.save_pretrained(tmp_path / "out", dtype=dtype)
    report = baked.export_report
    [check] = _image_checks(report)  # float32: the reload; bfloat16: the float32 fold (scratch copy / in memory)
    assert check.gating and check.passed and get_tolerance(IMAGE_ROW).gating
    assert check.label.startswith("image+text probe") and check.top1 == 1.0
    assert check.per_probe[0].name == "image-text" and check.per_probe[0].positions > 4  # image tokens + text
    assert check.details["hooked_vs_base_max_rel"] > 100 * check.max_rel_limit, check.details
    assert not any("image+text" in n for n in report.notes), report.notes
    written = json.loads((out / "lineas_verification.json").read_text())
    [row] = [c for c in written["checks"] if c["tolerance"]["name"] == IMAGE_ROW]
    assert row["passed"] and row["details"]["hooked_vs_base_max_rel"] == check.details["hooked_vs_base_max_rel"]


def _corrupt_decoder(folder, decoder: str):
    """Move one text-decoder weight of the written export by 0.1 (a wrong fold, as the reload check sees it)."""
    from safetensors.torch import load_file, save_file

    [weights] = sorted(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    [key] = [k for k in tensors if k.endswith("layers.0.mlp.up_proj.weight")]
    assert decoder.split(".")[-1] in key  # language_model / text_model: the decoder's, not the vision tower's
    tensors[key] += 0.1
    save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("out_of_core", [False, True], ids=["bake", "bake_folder"])
def test_image_probe_fails_on_a_corrupted_export(out_of_core, tmp_path, monkeypatch):
    from bake.errors import VerificationError
    from bake.formats import hf, hf_stream

    model, src = _source_with_processor("llava", tmp_path)
    real = hf.copy_base_files

    def corrupt_then_copy(baked, folder):  # after the weights are written, before the reload check
        _corrupt_decoder(folder, text_decoder(model))
        return real(baked, folder)

    monkeypatch.setattr(hf, "copy_base_files", corrupt_then_copy)
    monkeypatch.setattr(hf_stream, "copy_base_files", corrupt_then_copy)
    baked = (bake_folder if out_of_core else bake)(str(src), _maps(model, shift=True), require_standard=True)
    out = tmp_path / "out"
    with pytest.raises(VerificationError) as err:
        baked.save_pretrained(out)
    assert not out.exists()
    [check] = _image_checks(err.value.report)
    assert not check.passed and any("max relative logit error" in f for f in check.failures), check.failures
    assert any(f.startswith("image+text probe") for f in err.value.report.failures)


@pytest.mark.parametrize("out_of_core", [False, True], ids=["bake", "bake_folder"])
@pytest.mark.parametrize("arch", ["gemma3", "mistral3"])
def test_vlm_without_processor_is_noted(arch, out_of_core, tmp_path):
    """No processor in the source folder: no image probe, and the report says so (a warning), never silently."""
    model, src = _source(arch, tmp_path)  # tokenizer only
    baked = (bake_folder if out_of_core else bake)(str(src), _maps(model, shift=False), require_standard=True)
    out = baked.save_pretrained(tmp_path / "out")
    report = baked.export_report
    assert not _image_checks(report)
    [note] = [n for n in report.notes if n.startswith("image+text probe not run")]
    assert "text probes only" in note and note in report.warnings
    assert note in json.loads((out / "lineas_verification.json").read_text())["notes"]
    assert note in (out / "README.md").read_text()


def test_text_model_has_no_image_note(tmp_path):
    from tiny import tiny_model

    model = tiny_model("llama")
    dec = "model"
    g = torch.Generator().manual_seed(0)
    n = model.config.hidden_size
    maps = SteeringMaps({f"{dec}.layers.0.post_attention_layernorm": SiteMap(1 + 0.3 * torch.randn(n, generator=g),
                                                                           torch.zeros(n))}, {"method": "test"})
    baked = bake(model, maps)
    assert baked.reference.image is None and baked.report.notes == []


# ----------------------------------------------------------------------------- lineas-train on a VLM
# text model entry the trainer's --foldable auto plans with, and the shifts it freezes (nothing takes them)
TRAIN_CASES = {"llava": ("llama", set()),
               "gemma3": ("gemma3_text", {"layers.0.post_attention_layernorm", "layers.1.post_attention_layernorm"}),
               "mistral3": ("mistral", {"layers.0.input_layernorm", "layers.0.post_attention_layernorm",
                                        "layers.1.input_layernorm", "layers.1.post_attention_layernorm"})}


@pytest.mark.parametrize("arch", sorted(TRAIN_CASES))
def test_lineas_train_on_a_vlm_from_text_prompts_bakes_standard(arch, tmp_path, capsys):
    """``lineas-train --foldable auto`` on a VLM folder, text prompts only (no images): the model loads with
    AutoModelForImageTextToText, the sites are its text decoder's, and the foldable plan is the text model's registry
    entry re-rooted under the decoder (bake.registry.vlm), freezing exactly the shifts no bias takes.  The maps bake
    with --require-standard (no affine module; the bake's verification reproduces the hooked model) and the export
    reloads without remote code and answers as the hooked model does.  The maps record the fingerprint of the config
    the trainer loaded (nested text/vision configs with the dtype it loaded in): the bake, reading config.json,
    accepts them."""
    from bake.cli.main import EXIT_OK
    from bake.cli.main import main as bake_main
    from lineas.cli import main as train_main
    from lineas.maps import SteeringMaps

    entry, frozen = TRAIN_CASES[arch]
    model, src = _source(arch, tmp_path)
    dec = text_decoder(model)
    (tmp_path / "a.txt").write_text("\n".join(f"the {w} was bad and slow" for w in "abcdefgh") + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"a {w} is good , kind and fast" for w in "abcdefgh") + "\n")
    maps_file = tmp_path / "maps.safetensors"
    assert train_main(["--model", str(src), "--source", str(tmp_path / "a.txt"), "--target", str(tmp_path / "b.txt"),
                       "--sites", dec.replace(".", r"\.") + r"\.layers\.\d+\.(input|post_attention)_layernorm",
                       "--steps", "3", "--lr", "0.05", "--batch-size", "4", "--foldable", "auto", "--quiet",
                       "--out", str(maps_file)]) == 0, capsys.readouterr().err
    maps = SteeringMaps.load(maps_file)
    assert sorted(maps.maps) == sorted(f"{dec}.layers.{i}.{n}" for i in (0, 1)
                                       for n in ("input_layernorm", "post_attention_layernorm"))
    foldable = json.loads(maps.metadata["foldable"])
    assert foldable["registry"] == entry and foldable["applied"]
    assert set(foldable["frozen"]) == {f"{dec}.{s}" for s in frozen}
    assert all(not maps[f"{dec}.{s}"].shift.any() for s in frozen)
    trained_shifts = [s for s in maps.maps if s.removeprefix(dec + ".") not in frozen]
    assert all(maps[s].shift.any() for s in trained_shifts)  # none for Mistral: no bias anywhere

    out = tmp_path / "out"
    assert bake_main(["--model", str(src), "--maps", str(maps_file), "--out", str(out), "--require-standard",
                      "--verify-tokens", "3"]) == EXIT_OK, capsys.readouterr().err
    assert json.loads((out / "lineas_provenance.json").read_text())["plan"]["affine_sites"] == []
    ids = _ids()
    base = _logits(model, input_ids=ids)
    with attach_maps(model, maps, 1.0):
        hooked = _logits(model, input_ids=ids)
    assert _rel(hooked, base) > 1e-3, "the learned maps must change the output, or the test proves nothing"
    reloaded = _load(out)
    assert type(reloaded) is type(model) and _rel(_logits(reloaded, input_ids=ids), hooked) < 1e-5
