"""The in-place GGUF bake (issue 27) on a Llama-3-8B-shaped Q4_K_M file, against a warm copy of the file.

Wall time and peak RSS of ``lineas-bake --model file.gguf --no-verify``, against a ``shutil.copyfile`` of the
same file timed in the same run.

    python benchmarks/gguf_inplace_8b.py --out-json                        # the recorded figure (~5 GB file)
    python benchmarks/gguf_inplace_8b.py --work /tmp/lineas-bench-8b --note "what else ran" --out-json

The file (made once, cached under ``--work``; reruns reuse it):

1. a random 2-layer checkpoint of Llama-3-8B's exact width (hidden 4096, intermediate 14336, 32 heads, 8 kv
   heads, vocab 128256; ``benchmarks/random_checkpoint.py``'s Llama-3 config and values, bf16), with
   SmolLM2's tokenizer (llama.cpp's converter takes only tokenizers it knows);
2. converted to f16 with llama.cpp's converter (:func:`bake.formats.gguf.convert`) and quantised to Q4_K_M
   with llama.cpp's own quantiser (:func:`bake.formats.gguf_quantise.quantise`, ``llama_model_quantize`` in a
   process of its own);
3. widened to 32 layers: every ``blk.N`` tensor's quantised bytes copied (gguf-py's ``GGUFWriter`` with
   ``raw_dtype``, nothing requantised) from one of the two quantised layers, and ``llama.block_count`` set to
   32; the tokenizer metadata (SmolLM2's 49152 tokens, which this converter does not pad) padded to the
   embedding's 128256 rows with ``[PAD{i}]`` tokens (score -1000, type UNUSED: what the converter's
   sentencepiece path writes), else llama.cpp refuses the file.  Q4_K_M gives a layer's
   ``attn_v``/``ffn_down`` Q6_K or Q4_K by llama.cpp's ``use_more_bits(i, n)``; of 2 layers, layer 0 gets
   Q4_K and layer 1 Q6_K, so layer N is copied from the one whose types ``use_more_bits(N, 32)`` gives
   a real 32-layer Q4_K_M file (checked on the file's types, recorded).

A full 32-layer random checkpoint would be 16 GB (bf16) and its quantisation on this 2-core machine slow;
the widened file has the real file's tensor names, shapes, types and size, but its 32 layers repeat 2 layers'
values.  ``construction`` in the JSON says so.

Measured in one run: a ``shutil.copyfile`` of the file into ``--work`` (timed, then deleted; the page cache is
not dropped, so the copy and the bake both read a warm file), then ``lineas-bake --model <file> --maps <maps>
--out <work>/baked --no-verify`` as a child process: wall time and peak RSS (``ru_maxrss`` of ``os.wait4``).
Verification is off: the bake's check runs the model in llama.cpp and a dequantised float32 copy in
transformers (a 32 GB float32 model and a 32 GB scratch file here), which this machine cannot hold.  After the
bake, cheaply: every quantised tensor of the output hashed (sha256, streamed) against the source's, the new
bias tensors counted, the output opened with gguf-py's ``GGUFReader``, and loaded by llama.cpp (n_ctx 8, in a
child process, as the bake's own checks load a file) which evaluates 2 tokens: llama.cpp refuses a file whose
tensors it does not expect, so this shows it takes the new bias tensors.

Maps: a random map on every layer's input_layernorm and post_attention_layernorm (64 sites, the demo's
sites; ``bake_scale.write_maps``: scale ~ U(0.95, 1.05), shift ~ U(-0.05, 0.05)); the shifts fold into new
F32 q/k/v and gate/up biases, ``b = W t`` with ``W`` dequantised one matrix at a time.

Prints one JSON object; ``--out-json [PATH]`` also writes it, with the machine facts, as
``benchmarks/tables.py record`` does (default ``benchmarks/results/gguf_inplace_8b.json``), for the tables of
docs/benchmarks.md (``make bench-tables``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bake_scale import run_measured, write_maps  # noqa: E402
from random_checkpoint import CheckpointShape, _llama3, generate  # noqa: E402

LAYERS = 32
SOURCE_LAYERS = 2
DIMS = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8)
SHAPE = CheckpointShape(name="llama3-8b-width-2-layers", shards=1, norm_center=1.0,
                        make_config=lambda: _llama3(**DIMS, num_hidden_layers=SOURCE_LAYERS))
FILE_NAME = "llama3-8b-shape-Q4_K_M.gguf"
MADE_NAME = FILE_NAME + ".made.json"      # how the cached file was made (read back on reuse)
MAKER_VERSION = "2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_JSON = HERE / "results" / "gguf_inplace_8b.json"
MORE_BITS = ("attn_v.weight", "ffn_down.weight")  # the tensors Q4_K_M gives Q6_K by use_more_bits


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits`` (src/llama-quant.cpp): which layers' attn_v / ffn_down Q4_K_M makes Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# -- making the file -----------------------------------------------------------------------------------------
def make_file(work: Path, seed: int) -> tuple[Path, dict, float | None]:
    """The widened Q4_K_M file in ``work``: reused when its record says it is this one, else made."""
    path, made = work / FILE_NAME, work / MADE_NAME
    if path.is_file() and made.is_file():
        record = json.loads(made.read_text())
        if (record.get("maker_version") == MAKER_VERSION and record.get("seed") == seed
                and record.get("bytes") == path.stat().st_size):
            return path, record, None
    start = time.perf_counter()
    from bake.formats.gguf import convert
    from bake.formats.gguf_quantise import quantise
    from lineas.models import resolve_model

    work.mkdir(parents=True, exist_ok=True)
    hf, f16, q2 = work / "hf-2-layers", work / "2-layers-f16.gguf", work / "2-layers-Q4_K_M.gguf"
    for p in (hf, f16, q2, path, made):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    steps = {}
    t = time.perf_counter()
    generate(SHAPE, hf, seed)
    tok = resolve_model("smollm2-135m")
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tok) / name, hf / name)
    steps["random_checkpoint_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    convert(hf, f16, "f16")
    steps["convert_f16_s"] = round(time.perf_counter() - t, 1)
    shutil.rmtree(hf)
    t = time.perf_counter()
    quant = quantise(f16, q2, "Q4_K_M")
    steps["quantise_s"] = round(time.perf_counter() - t, 1)
    f16.unlink()
    t = time.perf_counter()
    sources = widen(q2, path, LAYERS)
    steps["widen_s"] = round(time.perf_counter() - t, 1)
    q2.unlink()
    record = {"maker_version": MAKER_VERSION, "seed": seed, "bytes": path.stat().st_size, "steps": steps,
              "quantiser": quant["quantiser"], "ftype": quant["ftype"], "quantiser_fallbacks": quant["fallbacks"],
              "layer_sources": sources}
    made.write_text(json.dumps(record, indent=1) + "\n")
    return path, record, time.perf_counter() - start


def _layer_of(name: str) -> tuple[int, str] | None:
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def widen(src: Path, dst: Path, layers: int) -> dict:
    """``src``'s tensors with ``layers`` blocks, each block's bytes copied from the source block whose
    attn_v/ffn_down types llama.cpp's Q4_K_M gives that block of a ``layers``-block model."""
    import gguf
    from gguf.gguf_writer import WriterState

    from bake.store.gguf_file import GGUFStore

    store = GGUFStore(src)
    arch, n_src = store.architecture, store.block_count
    suffixes = [s for n in store.tensors if (lay := _layer_of(n)) and lay[0] == 0 for s in [lay[1]]]
    more = {i: all(store.info(f"blk.{i}.{s}").type_name == "Q6_K" for s in MORE_BITS) for i in range(n_src)}
    pick, mismatched = {}, []
    for n in range(layers):
        want = use_more_bits(n, layers)
        fits = [i for i in range(n_src) if more[i] == want]
        pick[n] = fits[0] if fits else 0
        if not fits:
            mismatched.append(n)
    reader = store.reader
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    alignment = store.field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)
    n_vocab = store.info("token_embd.weight").shape[0]
    n_tokens = len(store.field("tokenizer.ggml.tokens"))
    pad = {"tokenizer.ggml.tokens": [f"[PAD{i}]" for i in range(n_tokens, n_vocab)],  # as the converter's
           "tokenizer.ggml.scores": [-1000.0] * (n_vocab - n_tokens),                 # sentencepiece path pads
           "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * (n_vocab - n_tokens)}
    for f in reader.fields.values():  # as gguf_new_metadata.py (and bake.formats.gguf_inplace.write_gguf)
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = layers if f.name == f"{arch}.block_count" else f.contents()
        if f.name in pad and len(value) == n_tokens:
            value = value + pad[f.name]
        writer.add_key_value(f.name, value, vtype, sub_type=sub)
    order: list[tuple[str, str]] = []  # (name in the new file, name in the source)
    blocks_done = False
    for name in store.tensors:
        if _layer_of(name) is None:
            order.append((name, name))
        elif not blocks_done:
            order += [(f"blk.{n}.{s}", f"blk.{pick[n]}.{s}") for n in range(layers) for s in suffixes]
            blocks_done = True
    for new, old in order:
        raw, info = store.raw_tensor(old), store.info(old)
        writer.add_tensor_info(new, raw.data.shape, raw.data.dtype, info.n_bytes, raw_dtype=raw.tensor_type)
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        fout = writer.fout[0]
        for new, old in order:  # the stored bytes, in chunks (as write_gguf copies a tensor)
            ti = writer.tensors[0].pop(new)
            writer.write_padding(fout, fout.tell())
            for chunk in store.raw_chunks(old):
                fout.write(chunk)
            writer.write_padding(fout, ti.nbytes)
            writer.state = WriterState.WEIGHTS
    finally:
        writer.close()
    os.replace(tmp, dst)
    by_source = {f"blk.{i}": [n for n in range(layers) if pick[n] == i] for i in range(n_src)}
    return {"vocab_tokens_from_converter": n_tokens, "vocab_padded_to": n_vocab, "copied_from": by_source,
            "q6_k_attn_v_ffn_down": {f"blk.{i}": more[i] for i in range(n_src)},
            "layers_without_a_matching_source": mismatched}


# -- measuring -----------------------------------------------------------------------------------------------
def timed_copy(src: Path, work: Path) -> float:
    """Seconds of ``shutil.copyfile(src, <work>/copy)``; the copy is deleted, its dirty pages synced outside
    the timing (the page cache is not dropped: ``src`` is read warm, as the bake reads it)."""
    scratch = work / ".copy-scratch.gguf"
    if scratch.exists():
        scratch.unlink()
    start = time.perf_counter()
    shutil.copyfile(src, scratch)
    seconds = time.perf_counter() - start
    scratch.unlink()
    os.sync()
    return seconds


def sha_of(store, name: str) -> str:
    h = hashlib.sha256()
    for chunk in store.raw_chunks(name):
        h.update(chunk)
    return h.hexdigest()


def compare(src_path: Path, out_path: Path) -> dict:
    """The output against the source: quantised tensors byte-identical (streamed sha256 of each), the other
    tensors unchanged / rewritten, the new ones, and the largest matrix the bake dequantised."""
    from bake.store.gguf_file import GGUFStore

    src, dst = GGUFStore(src_path), GGUFStore(out_path)
    t0 = time.perf_counter()
    quantised = [n for n, i in src.tensors.items() if i.quantised]
    differ = [n for n in quantised if n not in dst.tensors or dst.info(n).type_name != src.info(n).type_name
              or dst.info(n).shape != src.info(n).shape or sha_of(src, n) != sha_of(dst, n)]
    plain = [n for n, i in src.tensors.items() if not i.quantised]
    unchanged = [n for n in plain if n in dst.tensors and dst.raw_bytes(n) == src.raw_bytes(n)]
    new = sorted(n for n in dst.tensors if n not in src.tensors)
    hashed_s = time.perf_counter() - t0
    matrices = [n[: -len(".bias")] + ".weight" for n in new]
    matrices += [n[: -len(".bias")] + ".weight" for n in plain if n.endswith(".bias") and n not in unchanged]
    big = max(matrices, key=lambda n: _numel(src.info(n).shape), default=None)
    biggest = None
    if big is not None:
        info = src.info(big)
        numel = _numel(info.shape)
        biggest = {"tensor": big, "shape": list(info.shape), "type": info.type_name,
                   "stored_bytes": info.n_bytes, "float32_bytes": 4 * numel,
                   "float64_bytes": 8 * numel}  # fold_math computes b + W t in float64 (bake.core.fold_math)
    types: dict[str, dict] = {}
    for i in src.tensors.values():
        row = types.setdefault(i.type_name, {"type": i.type_name, "tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += i.n_bytes
    return {
        "tensors_in_source": len(src.tensors), "tensors_in_output": len(dst.tensors),
        "quantised_tensors": len(quantised), "quantised_byte_identical": len(quantised) - len(differ),
        "quantised_differing": differ[:8], "f32_tensors_unchanged": len(unchanged),
        "f32_tensors_rewritten": len(plain) - len(unchanged), "new_bias_tensors": len(new),
        "new_bias_examples": new[:5], "hash_compare_s": round(hashed_s, 1),
        "largest_dequantised_matrix": biggest,
        "output_block_count": dst.block_count,
        "output_lineas_keys": sorted(k for k in dst.reader.fields if k.startswith("lineas.")),
        "source_tensor_types": sorted(types.values(), key=lambda r: -r["bytes"]),
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def llama_cpp_load(path: Path, threads: int) -> dict:
    """llama.cpp loads ``path`` and evaluates 2 tokens, in a child process (:func:`bake.formats.llamacpp.load_llamacpp`,
    as the bake's own checks run it: weight repacking off on AMX machines); an error if it cannot."""
    from bake.formats.llamacpp import load_llamacpp

    t0 = time.perf_counter()
    try:
        with load_llamacpp(path, n_ctx=8, threads=threads) as llm:
            loaded = time.perf_counter() - t0
            logits = llm.logits([1, 2])
            return {"loaded": True, "load_s": round(loaded, 1),
                    "eval_2_tokens_s": round(time.perf_counter() - t0 - loaded, 1), "n_vocab": llm.n_vocab(),
                    "logits_finite": bool(np.isfinite(logits).all()), "weight_repack": llm.weight_repack}
    except Exception as e:  # noqa: BLE001 - recorded, not raised: the figure is still the bake's
        return {"loaded": False, "error": f"{type(e).__name__}: {e}"[-600:]}


def relative(p: str) -> str:
    try:
        return str(Path(p).relative_to(REPO))
    except ValueError:
        return p


def bench(args) -> dict:
    work = args.work.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    path, made, made_s = make_file(work, args.seed)
    size = path.stat().st_size
    maps = work / "maps.safetensors"
    config = SimpleNamespace(model_type="llama", hidden_size=DIMS["hidden_size"], num_hidden_layers=LAYERS)
    sites = write_maps(config, maps, args.seed)
    copy_s = timed_copy(path, work)
    out = work / "baked"
    if out.exists():
        shutil.rmtree(out)
    script = Path(sys.executable).with_name("lineas-bake")
    prog = [str(script)] if script.is_file() else [sys.executable, "-m", "bake.cli.main"]
    cmd = [*prog, "--model", str(path), "--maps", str(maps), "--strength", str(args.strength), "--out", str(out),
           "--no-verify"]
    stderr = work / "bake.stderr"
    code, wall, rss = run_measured(cmd, work / "bake.stdout", stderr)
    result = {
        "construction": (f"a random {SOURCE_LAYERS}-layer Llama-3-8B-width checkpoint (benchmarks/random_checkpoint.py "
                         "values, bf16, SmolLM2's tokenizer) converted "
                         "to f16 by llama.cpp's converter and quantised to Q4_K_M by llama.cpp's quantiser "
                         f"(llama_model_quantize), then widened to {LAYERS} layers by copying the quantised "
                         "layers' bytes under blk.N names with gguf-py's GGUFWriter (raw_dtype) and setting "
                         f"llama.block_count = {LAYERS} and padding the tokenizer metadata's 49152 tokens to "
                         f"the embedding's {DIMS['vocab_size']} rows with [PAD{{i}}] tokens (llama.cpp refuses a "
                         "file whose vocab and embedding differ); layer N copies the source layer whose "
                         f"attn_v/ffn_down types (Q4_K or Q6_K) Q4_K_M gives layer N of a {LAYERS}-layer model, "
                         "so names, shapes, types and size are a real 8B Q4_K_M file's, but the values repeat "
                         "2 layers'"),
        "shape": {"hidden": DIMS["hidden_size"], "intermediate": DIMS["intermediate_size"], "layers": LAYERS,
                  "heads": DIMS["num_attention_heads"], "kv_heads": DIMS["num_key_value_heads"],
                  "vocab": DIMS["vocab_size"]},
        "file_bytes": size,
        "file_made_s": None if made_s is None else round(made_s, 1),
        "file_making": made,
        "map_sites": sites,
        "strength": args.strength,
        "cache": "warm: the page cache is not dropped; the copy and the bake read a file just written or read",
        "copy_wall_s": round(copy_s, 2),
        "bake_wall_s": round(wall, 2),
        "ratio_to_copy": round(wall / copy_s, 2) if copy_s > 0 else None,
        "bake_peak_rss_gib": round(rss, 3),
        "bake_exit_code": code,
        "verification": ("off (--no-verify): the bake's check runs the file in llama.cpp against a float32 "
                         "dequantised copy in transformers (32 GB model + 32 GB scratch file for 8B), which this "
                         "machine cannot hold; the checks below are the cheap ones"),
    }
    if code != 0:
        result["stderr_tail"] = "\n".join(stderr.read_text(errors="replace").splitlines()[-30:])
    else:
        baked = out / path.name
        result["output_bytes"] = baked.stat().st_size
        result["output"] = compare(path, baked)
        big = result["output"]["largest_dequantised_matrix"]
        if big:  # the one-matrix-at-a-time claim: the bake's peak against that matrix, not against the file
            result["largest_matrix_float32_gib"] = round(big["float32_bytes"] / 2**30, 3)
            result["peak_rss_over_file_size"] = round(rss * 2**30 / size, 3)
        result["llama_cpp"] = (llama_cpp_load(baked, args.threads) if not args.no_load
                               else {"loaded": None, "error": "skipped (--no-load)"})
        if not args.keep:
            shutil.rmtree(out)
    result["bake_command"] = shlex.join(relative(c) if i == 0 else c for i, c in enumerate(cmd))
    return result


def write_record(path: Path, figures: dict, argv: list[str], note: str, start, before, wall: float) -> None:
    """``figures`` as ``benchmarks/tables.py record`` keeps a result (same fields)."""
    from tables import load_average, machine

    command = shlex.join([relative(sys.executable), relative(str(Path(__file__).resolve())), *argv])
    out = {"benchmark": path.stem, "command": command, "machine": machine(), "date": start.isoformat(),
           "load_average": {"before": before, "after": load_average()}, "note": note or "",
           "wall_s": round(wall, 1), "exit_code": 0 if figures.get("bake_exit_code") == 0 else 1,
           "figures": figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {relative(str(path))}", file=sys.stderr)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lineas-bench-8b"),
                    help="where the file (cached), maps, copy, logs and bake go (default: %(default)s)")
    ap.add_argument("--strength", type=float, default=1.0, help="the bake's --strength (default: 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the checkpoint and the maps (default: 0)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads for the load check (default: "
                    "as the bake's checks pick them)")
    ap.add_argument("--no-load", action="store_true", help="skip the llama.cpp load check")
    ap.add_argument("--keep", action="store_true", help="keep the baked file in <work>/baked")
    ap.add_argument("--out-json", type=Path, nargs="?", const=DEFAULT_JSON, default=None, metavar="PATH",
                    help="also write the result as tables.py record does (default PATH: "
                         f"{relative(str(DEFAULT_JSON))})")
    ap.add_argument("--note", default="", help="free text kept with --out-json (what else ran)")
    args = ap.parse_args(argv)
    from tables import load_average

    start = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    before, t0 = load_average(), time.perf_counter()
    figures = bench(args)
    print(json.dumps(figures, indent=1))
    if args.out_json is not None:
        rec_argv, skip = [], False  # the note is stored as its own field, not in the command
        for a in argv:
            if not skip and not a.startswith("--note="):
                skip = a == "--note"
                rec_argv += [] if skip else [a]
            else:
                skip = False
        write_record(args.out_json, figures, rec_argv, args.note, start, before, time.perf_counter() - t0)
    return 0 if figures["bake_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
