"""Import of apple/ml-act and apple/ml-lineas saved hooks (synthetic .statedict files)."""

import json

import pytest
import torch
from tiny import random_ids, tiny_model

from lineas.cli import main
from lineas.hooks import steered
from lineas.learn.mlact import MlActImportError, import_mlact
from lineas.maps import SteeringMaps

D = 64


def _hook_state(seed=0, quantiles_src=None, dim=D):
    """What ml-act's LinearOTHook.state_dict() holds after fit (q_all already turned into [-1e6, 1e6])."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "net.w1": 1 + 0.3 * torch.randn(1, dim, generator=g),
        "net.b1": 0.2 * torch.randn(1, dim, generator=g),
        "quantiles_dict_src": {"q_0_100": [torch.zeros(dim), torch.ones(dim)]},
        "quantiles_src": [-1e6, 1e6] if quantiles_src is None else quantiles_src,
    }
    return state


def _save(path, state):
    torch.save(state, path)
    return path


def test_single_file_round_trip_and_hook_equivalence(tmp_path):
    site = "model.layers.1.post_attention_layernorm"
    state = _hook_state()
    f = _save(tmp_path / f"{site}:0.statedict", state)
    maps = import_mlact(f, base_model="tiny")
    assert maps.sites == [site]
    assert torch.equal(maps[site].scale, state["net.w1"].reshape(-1))
    assert torch.equal(maps[site].shift, state["net.b1"].reshape(-1))
    assert maps.metadata["method"] == "imported-mlact" and maps.metadata["base_model"] == "tiny"
    # The imported map does what ml-act's hook does: z -> w1 * z + b1 on the module output.
    model = tiny_model("llama")
    ids = random_ids(2, 6)
    got = {}
    mod = dict(model.named_modules())[site]
    mod.register_forward_hook(lambda m, i, o: got.__setitem__("raw", o.clone()), prepend=True)
    with steered(model, maps, 1.0), torch.no_grad():
        # Registered after the steering hook, so it sees the steered output.
        mod.register_forward_hook(lambda m, i, o: got.__setitem__("out", o.clone()))
        model(ids)
    assert torch.allclose(got["out"], state["net.w1"] * got["raw"] + state["net.b1"], atol=1e-6)


def test_folder_in_layer_order_and_string_q_all(tmp_path):
    for layer in (10, 2, 1):
        _save(tmp_path / f"model.layers.{layer}.mlp.statedict", _hook_state(layer, quantiles_src="q_all"))
    (tmp_path / "notes.txt").write_text("ignored")
    maps = import_mlact(tmp_path)
    assert maps.sites == ["model.layers.1.mlp", "model.layers.2.mlp", "model.layers.10.mlp"]
    assert len(json.loads(maps.metadata["imported_from"])) == 3


def test_ml_lineas_hook_without_quantile_keys(tmp_path):
    state = {"net.w1": torch.ones(1, 8) * 2, "net.b1": torch.zeros(1, 8)}
    maps = import_mlact(_save(tmp_path / "enc.statedict", state))
    assert torch.equal(maps["enc"].scale, torch.full((8,), 2.0))


@pytest.mark.parametrize("gate", ["q_0_100", [torch.zeros(D), torch.ones(D)]])
def test_quantile_gate_is_refused_unless_overridden(tmp_path, gate, capsys, caplog):
    f = _save(tmp_path / "model.layers.0.mlp.statedict", _hook_state(quantiles_src=gate))
    with pytest.raises(MlActImportError, match="quantiles_src.*not q_all.*--ignore-quantile-gate"):
        import_mlact(f)
    out = tmp_path / "out.safetensors"
    assert main(["import-mlact", str(f), "--out", str(out)]) == 2
    assert "piecewise" in capsys.readouterr().err and not out.exists()
    with caplog.at_level("WARNING"):
        assert main(["import-mlact", str(f), "--out", str(out), "--ignore-quantile-gate"]) == 0
    assert "ignore-quantile-gate" in caplog.text and "DIFFERENT intervention" in caplog.text
    maps = SteeringMaps.load(out)
    assert json.loads(maps.metadata["quantile_gate_ignored"]) == ["model.layers.0.mlp"]


def test_refuses_unsafe_or_malformed_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.statedict"
    torch.save({"net.w1": torch.ones(1, 2), "net.b1": torch.zeros(1, 2), "x": Evil()}, evil)
    with pytest.raises(MlActImportError, match="weights_only"):
        import_mlact(evil)
    with pytest.raises(MlActImportError, match="net.b1"):
        import_mlact(_save(tmp_path / "a.statedict", {"net.w1": torch.ones(1, 2)}))
    with pytest.raises(MlActImportError, match="diagonal"):
        import_mlact(_save(tmp_path / "b.statedict", {"net.w1": torch.ones(1, 2), "net.b1": torch.zeros(1, 2),
                                                      "net.A": torch.eye(2)}))
    with pytest.raises(MlActImportError, match=r"\(1, D\)"):
        import_mlact(_save(tmp_path / "c.statedict", {"net.w1": torch.ones(2, 2), "net.b1": torch.zeros(2, 2)}))
    with pytest.raises(MlActImportError, match="element 1"):
        import_mlact(_save(tmp_path / "d:1.statedict", _hook_state()))
    (tmp_path / "e.statedict").write_bytes(b"garbage")
    with pytest.raises(MlActImportError, match="weights_only"):
        import_mlact(tmp_path / "e.statedict")
    with pytest.raises(MlActImportError, match="not found"):
        import_mlact(tmp_path / "absent.statedict")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MlActImportError, match="no"):
        import_mlact(empty)


def test_import_help(capsys):
    assert main(["import-mlact", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--ignore-quantile-gate" in text and "--out" in text and "weights_only" in text
