
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
        report = clq_triton.patch(model, "w4a4", progress=False)
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


def test_patch_skips_bad_k_with_one_warning_and_strict_raises():
    model = _Toy()
    with pytest.warns(UserWarning, match=r"kept 1 Linear layer\(s\) in full precision: "
                                         r"blocks.0.3 \(K=48 is not a positive multiple of 64\)"):
        report = clq_triton.patch(model, QuantConfig(group_size=64), progress=False)
    assert report.quantized == ["blocks.0.0", "blocks.0.2"]
    assert report.skipped == {"blocks.0.3": "K=48 is not a positive multiple of 64"}
    assert "kept in full precision: blocks.0.3" in report.summary()
    assert type(model.embed) is nn.Linear  # outside the block list
    with pytest.raises(ValueError, match="blocks.0.3: K=48"):
        clq_triton.patch(_Toy(), QuantConfig(group_size=64), strict=True, progress=False)


def test_patch_on_a_model_without_block_list_says_how_to_quantize_anyway():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with pytest.warns(UserWarning, match="no eligible nn.Linear.*blocks_only=False"):
        report = clq_triton.patch(model, progress=False)
    assert not report.quantized
    report = clq_triton.patch(model, blocks_only=False, progress=False)
    assert report.quantized == ["0", "2"]


def test_patch_shrinks_hadamard_block_to_divide_k():
    model = _Toy()
    with pytest.warns(UserWarning, match="blocks.0.3"):
        clq_triton.patch(model, QuantConfig(group_size=None, hadamard_block=256), progress=False)
    assert model.blocks[0][0].config.hadamard_block == 64
    assert model.blocks[0][2].config.hadamard_block == 128
    assert type(model.blocks[0][3]) is nn.Linear  # K=48 is not a multiple of 64


def test_patch_include_and_config_forms():
    model = _Toy()
    report = clq_triton.patch(model, include=(r"blocks\.0\.0$",), progress=False)
    assert report.quantized == ["blocks.0.0"]
    assert str(report).startswith("hadamard w4a4: quantized 1 Linear layers")
    report = clq_triton.patch(_Toy(), "w8a8", "rtn", include=(r"blocks\.0\.0$",), progress=False)
    assert report.config == QuantConfig(w_bits=8, a_bits=8) and report.method == clq_triton.RTN()
    with pytest.raises(ValueError, match="look like"):
        clq_triton.patch(_Toy(), "int4", progress=False)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_a_failed_patch_leaves_the_model_as_it_was(monkeypatch):
    """An error while quantizing layer 2 of 3 puts layer 1 back: no half-patched model."""
    model = _Toy()
    before = _weights(model)
    real = QuantLinear.from_linear
    calls = []

    def failing(lin, cfg, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planted failure")
        return real(lin, cfg, *a, **kw)

    monkeypatch.setattr(QuantLinear, "from_linear", staticmethod(failing))
    with pytest.raises(RuntimeError, match="planted failure"):
        clq_triton.patch(model, QuantConfig(group_size=None), include=(r"blocks\.0\.[02]$",),
                         progress=False)
    assert len(calls) == 2
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not hasattr(model, "_clq_patch")
    after = _weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_failed_calibration_leaves_the_model_as_it_was(monkeypatch):
    from toy_models import planted_dit
    from clq_triton import calibrate as cal

    model = planted_dit(0, layers=2)
    before = _weights(model)
    data = clq_triton.CalibrationData.from_inputs([dict(
        hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500]),
        class_labels=torch.tensor([1]))])
    real = cal._calibrate_block
    blocks = []

    def failing(model, names, todo, *a):
        blocks.append(names)
        if len(blocks) == 2:  # block 0 was quantized and installed
            raise RuntimeError("planted failure")
        return real(model, names, todo, *a)

    monkeypatch.setattr(cal, "_calibrate_block", failing)
    with clq_triton.backend("torch"), pytest.raises(RuntimeError, match="planted failure"):
        clq_triton.patch(model, "w4a4", clq_triton.CLQ(clps=False), data, progress=False)
    assert len(blocks) == 2
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = _weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_patching_a_patched_model_is_refused():
    model = _Toy()
    clq_triton.patch(model, "w4a4", include=(r"blocks\.0\.0$",), progress=False)
    before = _weights(model)
    with pytest.raises(ValueError, match="already holds 1 QuantLinear.*blocks.0.0"):
        clq_triton.patch(model, "w8a8", progress=False)
    assert type(model.blocks[0][2]) is nn.Linear and model._clq_patch["config"]["w_bits"] == 4
    after = _weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_data_free_method_given_calibration_warns():
    data = clq_triton.CalibrationData.from_inputs([dict(x=torch.randn(2, 64))])
    with pytest.warns(UserWarning, match="'rtn' is data-free: the calibration data"):
        clq_triton.patch(_Toy(), QuantConfig(group_size=None), "rtn", data, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replaced_linears_leave_the_gpu_while_patching(monkeypatch):
    """The FP Linears patch() replaced move to the CPU as they are replaced (kept there for a
    rollback until it returns): the GPU never holds FP and quantized weights of every layer."""
    from clq_triton import swap

    model = _Toy().cuda()
    seen = []
    real = swap.Originals.install

    def install(self, name, original, new):
        real(self, name, original, new)
        seen.append(original.weight.device.type)

    monkeypatch.setattr(swap.Originals, "install", install)
    clq_triton.patch(model, QuantConfig(group_size=None), progress=False)
    assert seen == ["cpu", "cpu"]
