import pytest
import torch
from torch import nn

from clq_triton import QuantLinear
from clq_triton import CLQ, METHODS, RTN, Hadamard, QuantConfig, QuaRot, SmoothQuant, SVDQuant
from clq_triton.methods import method_config, method_from_dict


@pytest.mark.parametrize("method", [CLQ(), CLQ(cbc=False, clps_target="output",
                                               w_clip_grid=(1.0, 0.7)),
                                    CLQ(shift=True, smooth_alpha=0.3, clps_target="depth",
                                        clps_depth=2), SmoothQuant(alpha=0.8),
                                    SVDQuant(alpha=0.4, rank=8), CLQ(lowrank=4, gptq=True),
                                    QuaRot(), QuaRot(gptq=True), RTN(), Hadamard(),
                                    CLQ(perm_run=8)])
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
    with pytest.raises(ValueError, match="perm_run"):
        CLQ(perm_run=4)


def test_fields_added_since_read_as_their_defaults():
    """Saved configs from before ``perm_run`` (or ``gptq``) existed mean the defaults: single
    channels, round to nearest."""
    old = method_from_dict({"method": "clq", "format": 1, "clps_target": "depth"})
    assert old == CLQ(clps_target="depth") and old.perm_run == 1 and not old.gptq
    assert method_from_dict(CLQ(perm_run=8).to_dict()).perm_run == 8


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
    assert set(METHODS) == {"clq", "smoothquant", "svdquant", "quarot", "rtn", "hadamard"}
    assert not QuaRot().calibrated and QuaRot(gptq=True).calibrated
    assert CLQ(w_clip_grid=[1.0, 0.9]).w_clip_grid == (1.0, 0.9)  # hashable, frozen


def _quantized_output(method, lin, x, cfg):
    """Calibrate one layer's channel transform on x itself (ChannelRange statistics), quantize
    it and return its output on x."""
    from clq_triton.smoothing import ChannelRange

    stats = ChannelRange({"l": lin})
    lin(x)
    stats.close()
    cfg = method.layer_config(cfg, lin.in_features)
    tf = method.channel_transform(stats.lo["l"], stats.hi["l"], stats.mean["l"], lin, cfg)
    with torch.no_grad():
        return QuantLinear.from_linear(lin, cfg, tf.perm, tf.scale, tf.shift)(x).double()


def _outlier_pair(gen, k=256, n=64):
    """A Linear and its inputs, and the same FP function with 4 channels scaled 30-80x
    (x_c·a, W[:, c]/a) and 4 channels offset by 20-40 (x_c + δ, b − W[:, c]·δ)."""
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=gen))
    x = torch.randn(4, 16, k, generator=gen)
    chans = torch.randperm(k, generator=gen)[:8]
    a = torch.ones(k)
    a[chans[:4]] = 30 + 50 * torch.rand(4, generator=gen)
    delta = torch.zeros(k)
    delta[chans[4:]] = 20 + 20 * torch.rand(4, generator=gen)
    lin2 = nn.Linear(k, n)
    with torch.no_grad():
        lin2.weight.copy_(lin.weight / a)
        lin2.bias.copy_(lin.bias - lin2.weight @ delta)
    x2 = x * a + delta
    return lin, x, lin2, x2


@pytest.mark.parametrize("group", [None, 64])
def test_obs_smoothing_and_shift_undo_rescaling_and_offsets(gen, group):
    """CLQ with smoothing and shift quantizes a layer the same whether or not its channels were
    rescaled and offset in an FP-preserving way; plain OBS (permutation + Hadamard) loses."""
    lin, x, lin2, x2 = _outlier_pair(gen)
    with torch.no_grad():
        ref = lin(x).double()
        torch.testing.assert_close(lin2(x2).double(), ref, rtol=0, atol=1e-3)
    cfg = QuantConfig(w_bits=4, a_bits=4, group_size=group)

    def err(method, lin_, x_):
        return float((_quantized_output(method, lin_, x_, cfg) - ref).norm() / ref.norm())

    full = CLQ(shift=True, smooth_alpha=0.5)
    assert CLQ().shift and CLQ().smooth_alpha == 0.3  # the defaults include both
    clean, moved = err(full, lin, x), err(full, lin2, x2)
    assert moved < 1.1 * clean + 1e-3, (clean, moved)  # invariant up to rounding
    plain = err(CLQ(shift=False, smooth_alpha=None), lin2, x2)
    assert moved < 0.6 * plain, (moved, plain)
    smooth_only = err(CLQ(shift=False, smooth_alpha=0.5), lin2, x2)
    assert moved < smooth_only, (moved, smooth_only)  # the shift earns its place on offsets


def test_channel_statistics_ignore_calls_with_no_rows(gen):
    """A Linear called once with zero rows (Wan I2V's empty-text cross attention, an empty
    batch) adds nothing to its statistics; it used to raise IndexError (amin of nothing)."""
    from clq_triton.smoothing import ChannelRange

    lin = nn.Linear(64, 8)
    x = torch.randn(5, 64, generator=gen)
    for gram in (False, True):
        stats = ChannelRange({"l": lin}, gram=gram)
        lin(torch.zeros(0, 64))
        lin(x)
        lin(torch.zeros(2, 0, 64))
        stats.close()
        assert torch.equal(stats.lo["l"], x.amin(0)) and torch.equal(stats.hi["l"], x.amax(0))
        torch.testing.assert_close(stats.mean["l"], x.double().mean(0).float())
