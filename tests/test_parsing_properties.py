"""Property tests (hypothesis): random corruption of the inputs lineas-bake and lineas-train parse.

For the safetensors header reader, the maps parser and the index parser: a corrupted input is either
parsed correctly or refused with the project's error type, never another exception, never a hang
(each example runs against a deadline), and never read past its header when the header is absurd.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from bake.store.shards import ShardFolder, ShardFormatError, file_tensors  # noqa: E402
from lineas.maps import MAX_SITE_DIM, MapsFormatError, SiteMap, SteeringMaps, read_maps_header  # noqa: E402
from lineas.safetensors_check import SafetensorsHeaderError, parse_header, read_header  # noqa: E402

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOW = 2.0  # seconds: any single parse taking longer is a hang


def _good_file() -> bytes:
    return st_save({"a.scale": torch.ones(5), "a.shift": torch.zeros(5), "b.scale": torch.full((3,), 2.0),
                    "b.shift": torch.arange(3.0)},
                   metadata={"format": "lineas-maps", "format_version": "1", "sites": json.dumps(["a", "b"])})


GOOD = _good_file()
HEADER_LEN = struct.unpack("<Q", GOOD[:8])[0]
ORIGINAL = json.loads(GOOD[8:8 + HEADER_LEN])


@st.composite
def corrupted(draw, data: bytes = GOOD) -> bytes:
    """``data`` with a few random edits: byte flips (mostly in the header), truncation, insertion, a new length."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip-header", "truncate", "insert", "length", "append"]))
        if kind in ("flip", "flip-header") and out:
            hi = min(len(out), 8 + HEADER_LEN) if kind == "flip-header" else len(out)
            i = draw(st.integers(0, hi - 1))
            out[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del out[draw(st.integers(0, len(out))):]
        elif kind == "insert":
            i = draw(st.integers(0, len(out)))
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "length" and len(out) >= 8:
            out[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2 * len(out)), st.integers(0, 2 ** 64 - 1))))
        elif kind == "append":
            out += draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


@st.composite
def edited_headers(draw) -> bytes:
    """A header whose JSON is edited structurally (types, offsets, shapes, dtypes), re-encoded with a valid length."""
    header = json.loads(GOOD[8:8 + HEADER_LEN])
    data = GOOD[8 + HEADER_LEN:]
    names = [k for k in header if k != "__metadata__"]
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.text(max_size=8),
                               lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                               max_leaves=6)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*names, "__metadata__"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        if name == "__metadata__":
            key = draw(st.sampled_from(["format", "format_version", "sites", "other"]))
            header["__metadata__"][key] = draw(st.one_of(json_values, st.text(max_size=20).map(json.dumps)))
        elif field == "whole":
            header[name] = draw(json_values)
        elif field == "dtype":
            header[name] = header[name] if isinstance(header[name], dict) else dict(ORIGINAL[name])
            header[name]["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "I8", "F8_E4M3", "Q4", "", "f32"]))
        elif field == "shape":
            header[name] = header[name] if isinstance(header[name], dict) else dict(ORIGINAL[name])
            header[name]["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2 ** 31), max_size=3), json_values))
        else:
            b, e = ORIGINAL[name]["data_offsets"]
            header[name] = header[name] if isinstance(header[name], dict) else dict(ORIGINAL[name])
            header[name]["data_offsets"] = draw(st.one_of(
                st.tuples(st.integers(-4, len(data) + 4), st.integers(-4, len(data) + 4)).map(list), json_values,
                st.just([b, e + 4]), st.just([b - 4 if b >= 4 else 0, e])))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _timed(fn, *args):
    t = time.monotonic()
    try:
        return fn(*args)
    finally:
        assert time.monotonic() - t < SLOW, f"{fn.__name__} took {time.monotonic() - t:.1f} s"


def _readable_by_safetensors(path: Path) -> None:
    """What our reader accepts, safetensors itself must read too (no looser validation on our side)."""
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            f.get_tensor(k)


@SETTINGS
@given(blob=st.one_of(corrupted(), edited_headers()))
def test_safetensors_header_reader_parses_or_refuses(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(blob)
    try:
        header = _timed(read_header, path)
    except SafetensorsHeaderError:
        return
    assert header.data_start + sum(e.end - e.begin for e in header.entries.values()) == len(blob)
    _readable_by_safetensors(path)


@SETTINGS
@given(blob=st.one_of(corrupted(), edited_headers()))
def test_shard_reader_parses_or_refuses(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("s") / "model.safetensors"
    path.write_bytes(blob)
    try:
        infos, _ = _timed(file_tensors, path)
    except ShardFormatError:
        return
    for info in infos.values():  # every accepted range lies inside the file
        assert 0 < info.begin <= info.end <= len(blob)


@SETTINGS
@given(blob=st.one_of(corrupted(), edited_headers()))
def test_maps_parser_parses_or_refuses(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("m") / "maps.safetensors"
    path.write_bytes(blob)
    try:
        maps = _timed(SteeringMaps.load, path)
    except MapsFormatError:
        return
    assert maps.sites and all(torch.isfinite(m.scale).all() and torch.isfinite(m.shift).all() for _, m in maps.items())


@SETTINGS
@given(sites=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                          max_leaves=8))
def test_maps_sites_metadata_of_any_type_is_refused_or_exact(tmp_path_factory, sites):
    """``sites`` must be a JSON list of exactly the file's site names (strings); anything else is refused."""
    maps = SteeringMaps({"a": SiteMap.identity(2), "b": SiteMap.identity(2)}, {"sites": json.dumps(sites)})
    path = maps.save(tmp_path_factory.mktemp("t") / "maps.safetensors")
    try:
        loaded = SteeringMaps.load(path)
    except MapsFormatError as e:
        assert "sites" in str(e)
        return
    assert sorted(sites) == ["a", "b"] and loaded.sites == sites


INDEX_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.sampled_from(
        ["model.safetensors", "../x.safetensors", "/etc/passwd", "", ".", "..", "a/b.safetensors",
         "missing.safetensors"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@SETTINGS
@given(index=st.one_of(
    INDEX_VALUES,
    st.dictionaries(st.sampled_from(["weight_map", "metadata"]), INDEX_VALUES, max_size=2),
    st.dictionaries(st.text(max_size=8), INDEX_VALUES, max_size=4).map(lambda wm: {"weight_map": wm})),
    raw=st.none() | st.binary(max_size=40))
def test_index_parser_parses_or_refuses(tmp_path_factory, index, raw):
    folder = tmp_path_factory.mktemp("i")
    (folder / "model.safetensors").write_bytes(st_save({"w": torch.ones(2)}))
    (folder / "model.safetensors.index.json").write_bytes(raw if raw is not None else json.dumps(index).encode())
    try:
        shards = _timed(ShardFolder, folder)
    except ShardFormatError:
        return
    assert set(shards.files) <= {"model.safetensors"}  # nothing outside the folder, nothing that is not there


def test_absurd_maps_header_is_refused_without_reading_the_data(tmp_path):
    """A header claiming 2 GiB tensors (a sparse file, so the size is real) is refused from the header alone."""
    n = (2 << 30) // 4
    header = {"__metadata__": {"format": "lineas-maps", "format_version": "1"},
              "nowhere.scale": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
              "nowhere.shift": {"dtype": "F32", "shape": [n], "data_offsets": [4 * n, 8 * n]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + 8 * n)  # sparse: 4 GiB that take no disk
    t = time.monotonic()
    with pytest.raises(MapsFormatError, match=f"at most {MAX_SITE_DIM}"):
        SteeringMaps.load(path)
    assert time.monotonic() - t < 0.5


def test_unknown_site_is_refused_before_tensors_are_read(tmp_path, monkeypatch):
    maps = SteeringMaps({"not.a.module": SiteMap.identity(4)}, {})
    path = maps.save(tmp_path / "m.safetensors")
    import lineas.maps

    def no_read(*a, **k):
        raise AssertionError("tensors read before the site check")

    monkeypatch.setattr(lineas.maps, "safe_open", no_read)
    with pytest.raises(MapsFormatError, match="unknown site.*'not.a.module'"):
        SteeringMaps.load(path, known_sites={"model.norm"})
    assert read_maps_header(path).sites == ["not.a.module"]


@pytest.mark.parametrize("edit, needle", [
    (lambda h: h["a.scale"].update(data_offsets=[0, 24]), "needs 20 bytes"),
    (lambda h: (h["a.shift"].update(data_offsets=[0, 20]), h["a.scale"].update(data_offsets=[20, 40])) and None,
     None),  # swapped but contiguous: valid
    (lambda h: h["b.scale"].update(data_offsets=[h["a.scale"]["data_offsets"][0],
                                                 h["a.scale"]["data_offsets"][0] + 12]), "overlaps"),
    (lambda h: h["b.shift"].update(dtype="Q4"), "unknown dtype 'Q4'"),
    (lambda h: h["b.shift"].update(shape=[-3]), "non-negative integers"),
])
def test_header_checks_name_the_problem(tmp_path, edit, needle):
    header = json.loads(GOOD[8:8 + HEADER_LEN])
    edit(header)
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + GOOD[8 + HEADER_LEN:])
    if needle is None:
        assert read_header(path).entries
        return
    with pytest.raises(SafetensorsHeaderError, match=needle):
        read_header(path)
    with pytest.raises(ShardFormatError, match=needle):
        file_tensors(path)


def test_duplicate_names_and_non_objects_are_refused():
    with pytest.raises(SafetensorsHeaderError, match="duplicate name 'a'"):
        parse_header(b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": 1}', 0)
    for raw in (b"[]", b'"x"', b"{", b"\xff\xfe"):
        with pytest.raises(SafetensorsHeaderError):
            parse_header(raw, 0)


# ----------------------------------------------------------------------------- checks that can fail
def test_the_same_maps_twice_in_one_command_are_refused_unless_allowed(tmp_path, caplog):
    from bake.plan.inputs import RepeatedMapsError, check_repeated, normalise_maps

    a = SteeringMaps({"s": SiteMap(torch.full((2,), 1.5), torch.zeros(2))}, {"method": "x"})
    f = a.save(tmp_path / "f.safetensors")
    g = SteeringMaps(dict(a.items()), {"method": "other"}).save(tmp_path / "g.safetensors")  # same values
    other = SteeringMaps({"s": SiteMap(torch.full((2,), 0.5), torch.zeros(2))}, {}).save(tmp_path / "o.safetensors")
    with pytest.raises(RepeatedMapsError, match="the same file"):
        check_repeated(normalise_maps([(f, 1.0), (f, 0.5)]), allow=False)
    with pytest.raises(RepeatedMapsError, match=r"the same maps \(sites and values\)"):
        check_repeated(normalise_maps([f, g]), allow=False)
    with pytest.raises(RepeatedMapsError, match="the same file"):  # records, as the execute step passes them
        check_repeated([{"origin": "f", "sha256": "ab"}, {"origin": "f2", "sha256": "ab"}], allow=False)
    check_repeated(normalise_maps([f, other]), allow=False)
    with caplog.at_level("WARNING"):
        check_repeated(normalise_maps([f, f]), allow=True)
    assert "given twice in one command" in caplog.text


@pytest.mark.parametrize("strengths, needle", [((0.0,), "λ = 0 changes nothing"),
                                               ((1e-45,), "identity at every site"),
                                               ((1.0, -1.0), None)])
def test_a_strength_that_steers_nothing_is_refused(tmp_path, strengths, needle):
    from bake.plan.inputs import NoSteeringError, combined, normalise_maps

    maps = SteeringMaps({"s": SiteMap(torch.full((2,), 2.0), torch.zeros(2))}, {})
    pairs = [(maps, lam) for lam in strengths]
    if needle is None:  # λ = 1 then λ = -1: scales 2 then 0, not an inverse, so not the identity
        assert combined(normalise_maps(pairs))
        return
    with pytest.raises(NoSteeringError, match=needle):
        combined(normalise_maps(pairs))


def test_maps_that_cancel_out_are_refused():
    from bake.plan.inputs import NoSteeringError, combined, normalise_maps

    up = SteeringMaps({"s": SiteMap(torch.full((2,), 2.0), torch.ones(2))}, {})
    down = SteeringMaps({"s": SiteMap(torch.full((2,), 0.5), torch.full((2,), -0.5))}, {})
    with pytest.raises(NoSteeringError, match="identity at every site"):
        combined(normalise_maps([up, down]))  # 0.5 * (2y + 1) - 0.5 = y


def test_a_config_claiming_a_million_layers_is_refused_before_any_skeleton(tmp_path):
    from tiny import save_tiny

    from bake.store.checkpoint import load_config, load_skeleton
    from bake.store.safetensors_header import ConfigMismatchError

    folder = tmp_path / "m"
    save_tiny("llama", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10 ** 6}))
    config = load_config(folder)
    t = time.monotonic()
    with pytest.raises(ConfigMismatchError, match=r"num_hidden_layers=1000000, but the weights hold 2 layer"):
        load_skeleton(folder, config=config)
    assert time.monotonic() - t < 1.0
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 2 * cfg["hidden_size"]}))
    with pytest.raises(ConfigMismatchError, match=f"hidden_size={2 * cfg['hidden_size']}"):
        load_skeleton(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_skeleton(folder) is not None  # the real config passes


def test_a_catastrophic_site_regex_is_refused_in_bounded_time():
    from torch import nn

    from lineas.collect import SiteMatchError, match_sites

    model = nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList(
        nn.ModuleDict({"post_attention_layernorm": nn.LayerNorm(2)}) for _ in range(3))})})
    assert match_sites(model, [r"model\.layers\.\d+\.post_attention_layernorm"])
    t = time.monotonic()
    with pytest.raises(SiteMatchError, match="catastrophic backtracking"):
        match_sites(model, [r"(?:[\w.]|[\w.][\w.])+!?\d{5}"])
    assert time.monotonic() - t < 10


def test_prompt_and_maps_fifos_are_not_regular_files(tmp_path):
    import os

    from lineas.prompts import PromptError, load_prompts

    fifo = tmp_path / "p.txt"
    os.mkfifo(fifo)
    with pytest.raises(PromptError, match="not a regular file"):
        load_prompts(str(fifo))
    with pytest.raises(MapsFormatError, match="FIFO"):
        SteeringMaps.load(fifo)


def test_known_sites_are_checked_against_the_maps_header(tmp_path, monkeypatch):
    from torch import nn

    import lineas.maps
    from bake.plan.check import site_names
    from bake.plan.inputs import normalise_maps

    model = nn.ModuleDict({"norm": nn.LayerNorm(4)})
    good = SteeringMaps({"norm": SiteMap(torch.full((4,), 1.5), torch.zeros(4))}, {}).save(tmp_path / "g.st")
    bad = SteeringMaps({"no.such": SiteMap(torch.full((4,), 1.5), torch.zeros(4))}, {}).save(tmp_path / "b.st")
    assert site_names(model) == {"", "norm"}  # the root too: the planner explains why it is refused
    assert normalise_maps(good, known_sites=site_names(model))[0].maps.sites == ["norm"]
    monkeypatch.setattr(lineas.maps, "safe_open", lambda *a, **k: pytest.fail("tensors read before the site check"))
    with pytest.raises(MapsFormatError, match="unknown site.*'no.such'"):
        normalise_maps(bad, known_sites=site_names(model))
