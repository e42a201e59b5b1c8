import pytest

from clq_triton import CLQ, METHODS, RTN, Hadamard, QuantConfig, QuaRot, SmoothQuant
from clq_triton.methods import method_config, method_from_dict


@pytest.mark.parametrize("method", [CLQ(), CLQ(cbc=False, clps_target="output",
                                               w_clip_grid=(1.0, 0.7)), SmoothQuant(alpha=0.8),
                                    QuaRot(), RTN(), Hadamard()])
def test_method_config_roundtrips_through_its_dict(method):
    d = method.to_dict()
    assert d["method"] == method.name and d["format"] == 1
    assert method_from_dict(d) == method
    import json

    assert method_from_dict(json.loads(json.dumps(d))) == method  # tuples survive JSON


def test_method_from_dict_errors():
    with pytest.raises(ValueError, match="unknown quantization method 'gptq'"):
        method_from_dict({"method": "gptq", "format": 1})
    with pytest.raises(ValueError, match="format 7"):
        method_from_dict({"method": "clq", "format": 7})
    with pytest.raises(ValueError, match="unknown fields for CLQ: \\['beta'\\]"):
        method_from_dict({"method": "clq", "format": 1, "beta": 2})


def test_each_method_owns_its_rotation_choice():
    cfg = QuantConfig(hadamard_block=128)
    k = 3 * 1024
    assert RTN().layer_config(cfg, k).hadamard_block is None
    assert SmoothQuant().layer_config(cfg, k).hadamard_block is None
    assert Hadamard().layer_config(cfg, k).hadamard_block == 128
    assert Hadamard().layer_config(cfg, 192).hadamard_block == 64  # shrunk to divide K
    assert QuaRot().layer_config(cfg, k).hadamard_block == 1024  # widest power of two
    assert CLQ().layer_config(cfg, k).hadamard_block == 128
    assert CLQ(obs=False).layer_config(cfg, k).hadamard_block is None


def test_names_stand_for_default_configs():
    assert method_config("CLQ", True) == CLQ()
    assert method_config(None, True) == CLQ() and method_config(None, False) == Hadamard()
    assert set(METHODS) == {"clq", "smoothquant", "quarot", "rtn", "hadamard"}
    assert CLQ(w_clip_grid=[1.0, 0.9]).w_clip_grid == (1.0, 0.9)  # hashable, frozen
