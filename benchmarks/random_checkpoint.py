"""Random bf16 Hugging Face causal-LM checkpoints, written tensor by tensor without building a model.

The config comes from transformers' config class with the real hyper-parameters of the named model;
tensor names and shapes come from a skeleton on the ``meta`` device (no weight is allocated).  Each
tensor is generated in chunks of ``CHUNK_ELEMENTS`` values and streamed into its shard, so the
writer's memory stays around 100 MB whatever the model size.  The folder holds ``config.json``,
``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json`` in the layout that
``save_pretrained`` writes (tied embeddings: only ``model.embed_tokens.weight``), and no tokenizer.

Values (fixed seed, each tensor seeded from its name, so values do not depend on the shard count):
matrices ~ N(0, 0.02^2); norm weights ``center + 0.1 * N(0, 1)`` with center 0 for Gemma's
``x * (1 + w)`` norms and 1 for Llama's ``x * w`` ones, so a wrong norm-fold convention cannot hide.

    python benchmarks/random_checkpoint.py --shape tiny-llama --out /tmp/tiny-llama --check
    python benchmarks/random_checkpoint.py --shape gemma2-2b --out /work/bench-data/gemma2-2b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

GENERATOR_VERSION = "1"
CHUNK_ELEMENTS = 1 << 23      # values generated at a time (32 MB of float32)
MATRIX_STD = 0.02
NORM_STD = 0.1
INDEX_NAME = "model.safetensors.index.json"
DISK_MARGIN_BYTES = 1 << 30   # left free on the disk after writing


def _gemma2(**dims):
    import transformers

    return transformers.Gemma2Config(**dims, tie_word_embeddings=True, final_logit_softcapping=30.0,
                                     attn_logit_softcapping=50.0, max_position_embeddings=8192)


def _llama3(**dims):
    import transformers

    return transformers.LlamaConfig(**dims, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                                    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)


@dataclass(frozen=True)
class CheckpointShape:
    """A checkpoint to generate: its config, how many shards, and where its norm weights are centred."""

    name: str
    make_config: Callable[[], object]
    shards: int
    norm_center: float   # 0.0 for Gemma's (1 + w) norms, 1.0 for Llama's w norms


SHAPES = {s.name: s for s in (
    CheckpointShape(name="gemma2-2b", shards=3, norm_center=0.0, make_config=lambda: _gemma2(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096)),
    CheckpointShape(name="llama3-8b", shards=4, norm_center=1.0, make_config=lambda: _llama3(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8)),
    # Same classes and code path, a few MB: for testing the benchmark in seconds.
    CheckpointShape(name="tiny-gemma2", shards=3, norm_center=0.0, make_config=lambda: _gemma2(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)),
    CheckpointShape(name="tiny-llama", shards=4, norm_center=1.0, make_config=lambda: _llama3(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2)),
)}


@dataclass(frozen=True)
class Layout:
    """What a shape's folder holds: the config and, per shard file, its (tensor name, shape) list in order."""

    config: object
    shards: dict[str, list[tuple[str, tuple[int, ...]]]]

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for specs in self.shards.values() for _, shape in specs)

    @property
    def nbytes(self) -> int:
        return 2 * self.params  # bf16

    def weight_map(self) -> dict[str, str]:
        return {name: file for file, specs in self.shards.items() for name, _ in specs}


def layout(shape: CheckpointShape) -> Layout:
    """Tensor names and shapes from a meta-device skeleton, split in state-dict order into ``shape.shards``
    files of about equal size (each tensor goes to the shard holding its midpoint)."""
    import accelerate
    from transformers import AutoModelForCausalLM

    config = shape.make_config()
    with accelerate.init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # on meta the head is only tied on request; tied tensors are saved once
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.bfloat16
    seen, specs = set(), []
    for name, t in skeleton.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            specs.append((name, tuple(t.shape)))
    sizes = [2 * math.prod(s) for _, s in specs]
    total, n = sum(sizes), shape.shards
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    shards: dict[str, list] = {f: [] for f in files}
    before = 0
    for spec, size in zip(specs, sizes):
        shards[files[min(n - 1, int((before + size / 2) * n // total))]].append(spec)
        before += size
    empty = [f for f, s in shards.items() if not s]
    if empty:
        raise ValueError(f"shape {shape.name}: {n} shards leave {empty} empty; use fewer shards")
    return Layout(config=config, shards=shards)


def _tensor_seed(seed: int, name: str) -> int:
    return (seed << 32) ^ zlib.crc32(name.encode())


def _chunks(name: str, shape: tuple[int, ...], seed: int, norm_center: float):
    """The tensor's bf16 bytes, generated ``CHUNK_ELEMENTS`` values at a time."""
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    is_norm = len(shape) == 1 and "norm" in name
    left = math.prod(shape)
    while left:
        n = min(left, CHUNK_ELEMENTS)
        values = torch.randn(n, generator=g)
        values = values.mul_(NORM_STD).add_(norm_center) if is_norm else values.mul_(MATRIX_STD)
        yield values.to(torch.bfloat16).view(torch.int16).numpy()
        left -= n


def _generator_tag(shape: CheckpointShape, seed: int) -> str:
    return json.dumps({"generator": "benchmarks/random_checkpoint.py", "version": GENERATOR_VERSION,
                       "shape": shape.name, "seed": seed}, sort_keys=True)


def _header(specs, tag: str) -> bytes:
    header, offset = {}, 0
    for name, shape in specs:
        end = offset + 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    header["__metadata__"] = {"format": "pt", "lineas_random_checkpoint": tag}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _write_shard(path: Path, specs, seed: int, norm_center: float, tag: str) -> None:
    raw = _header(specs, tag)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            for chunk in _chunks(name, shape, seed, norm_center):
                f.write(chunk)


def _index_text(lay: Layout) -> str:
    # What save_pretrained writes (transformers 4.57): sorted keys, indent 2.
    index = {"metadata": {"total_parameters": lay.params, "total_size": lay.nbytes}, "weight_map": lay.weight_map()}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def invalid_reason(folder: Path, shape: CheckpointShape, seed: int = 0, lay: Layout | None = None) -> str | None:
    """None when ``folder`` is this generator's complete checkpoint of ``shape`` with ``seed``, else why not.
    Reads the index and the shard headers only."""
    lay = lay or layout(shape)
    index = folder / INDEX_NAME
    if not index.is_file():
        return f"{index} is missing"
    if index.read_text() != _index_text(lay):
        return f"{index} differs from the {shape.name} layout"
    if json.loads((folder / "config.json").read_text()).get("model_type") != lay.config.model_type:
        return f"{folder / 'config.json'} is not a {lay.config.model_type} config"
    tag = _generator_tag(shape, seed)
    for file, specs in lay.shards.items():
        raw = _header(specs, tag)
        path = folder / file
        expected = 8 + len(raw) + 2 * sum(math.prod(s) for _, s in specs)
        if not path.is_file() or path.stat().st_size != expected:
            return f"{path} is missing or not {expected} bytes"
        with open(path, "rb") as f:
            if f.read(8 + len(raw)) != struct.pack("<Q", len(raw)) + raw:
                return f"{path} has another header (shape, seed or generator version)"
    return None


def generate(shape: CheckpointShape, out: Path, seed: int = 0) -> Layout:
    """Write ``shape``'s checkpoint into ``out`` (which must not exist) through a temporary sibling folder
    renamed at the end, so an interrupted run leaves no half checkpoint under ``out``."""
    lay = layout(shape)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < lay.nbytes + DISK_MARGIN_BYTES:
        raise OSError(f"{out.parent} has {free / 2**30:.1f} GiB free; {shape.name} needs "
                      f"{(lay.nbytes + DISK_MARGIN_BYTES) / 2**30:.1f} GiB (checkpoint + 1 GiB margin)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        lay.config.save_pretrained(tmp)
        tag = _generator_tag(shape, seed)
        for file, specs in lay.shards.items():
            _write_shard(tmp / file, specs, seed, shape.norm_center, tag)
        (tmp / INDEX_NAME).write_text(_index_text(lay))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return lay


def ensure(shape: CheckpointShape, out: Path, seed: int = 0) -> tuple[Layout, float | None]:
    """The checkpoint at ``out``: reused when valid, generated when absent (then the seconds it took).
    A folder that exists but is not this checkpoint is an error, never overwritten."""
    lay = layout(shape)
    if Path(out).exists():
        reason = invalid_reason(Path(out), shape, seed, lay)
        if reason:
            raise ValueError(f"{out} exists but is not the {shape.name} checkpoint ({reason}); delete it first")
        return lay, None
    start = time.perf_counter()
    generate(shape, out, seed)
    return lay, time.perf_counter() - start


def check_loads(folder: Path, lay: Layout, full_model: bool) -> None:
    """Every tensor opens with safe_open with its planned shape and dtype; with ``full_model`` (small
    shapes only) transformers' from_pretrained also loads the folder with every weight in it."""
    from safetensors import safe_open

    for file, specs in lay.shards.items():
        with safe_open(str(folder / file), framework="pt") as f:
            assert list(f.keys()) == sorted(n for n, _ in specs), f"{file}: keys differ"
            for name, shape in specs:
                t = f.get_slice(name)
                assert tuple(t.get_shape()) == shape and t.get_dtype() == "BF16", f"{file}:{name}"
    if full_model:
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
        assert not any(info.values()), f"from_pretrained loading info: {info}"
        name, _ = lay.shards[next(iter(lay.shards))][0]
        with safe_open(str(folder / next(iter(lay.shards))), framework="pt") as f:
            assert torch.equal(model.state_dict()[name], f.get_tensor(name)), f"{name} differs after loading"
        if lay.config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "head not tied"
        logits = model(torch.arange(8).unsqueeze(0)).logits
        assert torch.isfinite(logits).all(), "non-finite logits"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--out", required=True, type=Path, help="folder to create (reused when already valid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="open every tensor with safe_open; tiny shapes are also loaded with from_pretrained")
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    try:
        lay, seconds = ensure(shape, args.out, args.seed)
    except (ValueError, OSError) as e:
        print(f"random_checkpoint: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        check_loads(args.out, lay, full_model=shape.name.startswith("tiny-"))
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(json.dumps({"shape": shape.name, "out": str(args.out), "params": lay.params, "folder_bytes": size,
                      "shards": shape.shards, "generated_s": None if seconds is None else round(seconds, 2),
                      "reused": seconds is None, "checked": args.check}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
