import logging

import pytest
import torch
from torch import nn

import clq_triton
from clq_triton import QuantConfig, QuantLinear
from diffusers_models import MODELS, output


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patch_diffusers_transformer_runs(name, device, gen):
    model, inputs = MODELS[name](gen)
    model = model.eval().to(device)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        ref = output(model, inputs)
        report = clq_triton.patch(model, bits="w4a4", progress=False)
        got = output(model, inputs)
    print(f"{name}: {report}")
    assert report.quantized and not report.skipped
    assert report.weight_ratio <= 0.29  # K = 64 here: 4-byte channel scales weigh 3 %
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(report.quantized)
    # adaLN modulation, embedders and the final projection stay in full precision
    assert not any("norm" in n.split(".")[-2] or "emb" in n for n in quantized)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"{name}: W4A4 output relative error vs FP {err:.3f}")
    assert err < 0.5


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 128), nn.GELU(),
                                                   nn.Linear(128, 48), nn.Linear(48, 64))])

    def forward(self, x):
        return self.blocks[0](self.embed(x))


def test_patch_skips_bad_k_with_log_and_strict_raises(caplog):
    model = _Toy()
    with caplog.at_level(logging.INFO, logger="clq_triton"):
        report = clq_triton.patch(model, QuantConfig(group_size=64), progress=False)
    assert report.quantized == ["blocks.0.0", "blocks.0.2"]
    assert "blocks.0.3" in report.skipped and "K=48 is not a positive multiple of 64" in caplog.text
    assert type(model.embed) is nn.Linear  # outside the block list
    with pytest.raises(ValueError, match="blocks.0.3: K=48"):
        clq_triton.patch(_Toy(), QuantConfig(group_size=64), strict=True, progress=False)


def test_patch_shrinks_hadamard_block_to_divide_k():
    model = _Toy()
    clq_triton.patch(model, QuantConfig(group_size=None, hadamard_block=256), progress=False)
    assert model.blocks[0][0].config.hadamard_block == 64
    assert model.blocks[0][2].config.hadamard_block == 128
    assert type(model.blocks[0][3]) is nn.Linear  # K=48 is not a multiple of 64


def test_patch_include_and_bits_conflict():
    model = _Toy()
    report = clq_triton.patch(model, include=(r"blocks\.0\.0$",), progress=False)
    assert report.quantized == ["blocks.0.0"]
    with pytest.raises(ValueError, match="contradicts"):
        clq_triton.patch(_Toy(), QuantConfig(), bits="w8a8", progress=False)
