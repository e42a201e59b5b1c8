"""The low-rank branch (QuantConfig.lowrank, SVDQuant, CLQ(lowrank=r)): the split against an
explicit float64 SVD, exactness at full rank with every channel transform, the error it removes
on weights with strong directions, storage, dtype casts and checkpoints."""

import copy

import pytest
import torch
from torch import nn

import clq_triton
from clq_triton import (CLQ, RTN, Hadamard, QuantConfig, QuantLinear, QuaRot, SmoothQuant,
                        SVDQuant)
from clq_triton.blocks import output_tensors, run_model
from clq_triton.capture import map_tensors
from clq_triton.lowrank import lowrank_split


@pytest.fixture(autouse=True)
def torch_backend():
    with clq_triton.backend("torch"):
        yield


def _spiky_linear(gen, k=256, n=96, spikes=4):
    """A Linear whose weight is noise plus a few strong rank-one directions (the outliers that
    smoothing moves into weights, which the branch is for)."""
    lin = nn.Linear(k, n)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    for _ in range(spikes):
        w += 12 * torch.outer(torch.randn(n, generator=gen), torch.randn(k, generator=gen)) / k
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


@pytest.mark.parametrize("rank", [1, 7, 32])
def test_split_is_the_best_rank_r_part_and_adds_up(gen, rank):
    w = torch.randn(40, 96, generator=gen)
    d = 0.5 + torch.rand(96, generator=gen)
    down, up, res = lowrank_split(w, rank, d, torch.float64)
    assert down.shape == (96, rank) and up.shape == (rank, 40)
    # (D⁻¹·down·up)ᵀ is the truncated SVD of w, computed here independently in float64
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    branch = ((down / d.double()[:, None]) @ up).T
    torch.testing.assert_close(branch, best, rtol=0, atol=1e-4)
    torch.testing.assert_close(branch + res.double(), w.double(), rtol=0, atol=1e-5)
    # in bf16 the residual absorbs the factors' rounding
    down16, up16, res16 = lowrank_split(w, rank, d, torch.bfloat16)
    assert down16.dtype == up16.dtype == torch.bfloat16
    back = ((down16.double() / d.double()[:, None]) @ up16.double()).T + res16.double()
    torch.testing.assert_close(back, w.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block, group", [(None, None), (64, 64), (32, 128)])
def test_full_rank_branch_gives_the_fp_layer(gen, block, group):
    """At rank min(N, K) the quantized residual is zero, so the layer is the FP one exactly,
    through the permutation, smoothing and shift (the bias corrects the branch for the shift,
    which it does not see)."""
    k, n = 128, 64
    lin = _spiky_linear(gen, k, n)
    perm = torch.randperm(k, generator=gen)
    scale = 0.25 + torch.rand(k, generator=gen)
    shift = 5 * torch.randn(k, generator=gen)
    cfg = QuantConfig(group_size=group, hadamard_block=block, lowrank=1000)
    q = QuantLinear.from_linear(lin, cfg, perm if block else None, scale, shift)
    assert q.config.lowrank == n  # clamped
    x = torch.randn(3, 17, k, generator=gen) + shift
    with torch.no_grad():
        torch.testing.assert_close(q(x).double(), lin(x).double(), rtol=0, atol=2e-4)
    torch.testing.assert_close(q.dequantized_weight(), lin.weight.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits, group", [("w4a4", 64), ("w4a8", None)])
def test_branch_removes_error_on_strong_directions(gen, bits, group):
    """On weights with a few strong directions a rank-8 branch cuts the output error of
    the quantized layer (the same rotation and scales otherwise), every time."""
    for _ in range(3):
        lin = _spiky_linear(gen)
        x = torch.randn(64, 256, generator=gen)
        cfg = QuantConfig.from_bits(bits, group_size=group)
        with torch.no_grad():
            ref = lin(x).double()
            errs = [float((QuantLinear.from_linear(lin, cfg.replace(lowrank=r))(x).double()
                           - ref).norm()) for r in (0, 8)]
        assert errs[1] < 0.8 * errs[0], errs


def test_storage_dtype_casts_and_nbytes(gen):
    lin = _spiky_linear(gen, 128, 64).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, QuantConfig(lowrank=8))
    assert q.lowrank_down.dtype == q.lowrank_up.dtype == torch.bfloat16  # the model's dtype
    plain = QuantLinear.from_linear(lin, QuantConfig())
    assert q.weight_nbytes() == plain.weight_nbytes() + 8 * (128 + 64) * 2
    assert plain.lowrank_down is None and "lowrank_down" not in plain.state_dict()
    q.float()
    assert q.lowrank_down.dtype == torch.float32 and q.wscale.dtype == torch.float32
    x = torch.randn(5, 128, generator=gen, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="lowrank 65 exceeds"):
        QuantLinear(128, 64, config=QuantConfig(lowrank=65))
    with pytest.raises(ValueError, match="lowrank must be an int"):
        QuantConfig(lowrank=-1)
    other = QuantLinear(128, 64, config=QuantConfig(lowrank=4))
    with pytest.raises(ValueError, match="rank 8 layer"):
        other.set_extra_state(q.get_extra_state())


def test_svdquant_method():
    m = SVDQuant(alpha=0.6, rank=16)
    cfg = m.layer_config(m.with_rank(QuantConfig(hadamard_block=64)), 256)
    assert cfg.hadamard_block is None and cfg.lowrank == 16
    assert CLQ(lowrank=4).with_rank(QuantConfig()).lowrank == 4
    assert CLQ().with_rank(QuantConfig()).lowrank == 0
    assert m.calibrated and clq_triton.methods.method_from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        SVDQuant(rank=0)


def _error(model, fp, data):
    with torch.no_grad():
        num = den = 0.0
        for s in data.samples:
            a = output_tensors(run_model(model, s, "cpu"))[0].double()
            b = output_tensors(run_model(fp, s, "cpu"))[0].double()
            num, den = num + float((a - b).pow(2).sum()), den + float(b.pow(2).sum())
        return (num / den) ** 0.5


def test_branch_lowers_model_error_and_round_trips(pipe_and_data, tmp_path):
    """On the planted DiT at W4A4 the branch lowers SmoothQuant's and CLQ's model error; the
    SVDQuant model saves and loads bit for bit, in bf16 too."""
    pipe, data = pipe_and_data
    fp = pipe.transformer
    errs = {}
    grid = dict(w_clip_grid=(1.0, 0.9), a_clip_grid=(1.0,))
    for name, method in {"sq": SmoothQuant(), "svdq": SVDQuant(rank=8),
                         "clq": CLQ(**grid), "clq+lr": CLQ(lowrank=8, **grid)}.items():
        model = copy.deepcopy(fp)
        report = clq_triton.patch(model, "w4a4", method, data, progress=False)
        errs[name] = _error(model, fp, data)
        if name == "svdq":
            svdq, svdq_report = model, report
    assert errs["svdq"] < errs["sq"] and errs["clq+lr"] < errs["clq"], errs
    plain = copy.deepcopy(fp)
    assert svdq_report.quant_weight_bytes > clq_triton.patch(plain, "w4a4",
                                                             progress=False).quant_weight_bytes
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(svdq).to(dtype)
        clq_triton.save_quantized(model, str(tmp_path / str(dtype)))
        loaded = clq_triton.load_quantized(str(tmp_path / str(dtype)))
        layer = next(m for m in loaded.modules() if isinstance(m, QuantLinear))
        assert layer.lowrank_down.dtype == dtype and layer.config.lowrank == 8
        with torch.no_grad():
            for s in data.samples:
                s = map_tensors(s, lambda t: t.to(dtype) if t.is_floating_point() else t)
                want = output_tensors(run_model(model, s, "cpu"))[0]
                got = output_tensors(run_model(loaded, s, "cpu"))[0]
                assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_given_split_gives_the_same_layer(gen, dtype):
    """from_linear(split=lowrank_parts(...)) is bit for bit the layer that splits itself; a
    split of the wrong shape is refused."""
    lin = _spiky_linear(gen).to(dtype)
    k = lin.in_features
    scale = 0.5 + torch.rand(k, generator=gen)
    shift = torch.randn(k, generator=gen) * 0.1
    perm = torch.randperm(k, generator=gen)
    cfg = QuantConfig(lowrank=6, hadamard_block=64, w_clip=0.9)
    split = QuantLinear.lowrank_parts(lin, 6, scale)
    got = QuantLinear.from_linear(lin, cfg, perm, scale, shift, split=split)
    want = QuantLinear.from_linear(lin, cfg, perm, scale, shift)
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="split has shapes"):
        QuantLinear.from_linear(lin, cfg, perm, scale, shift,
                                split=QuantLinear.lowrank_parts(lin, 5, scale))


def test_clip_search_splits_each_layer_once(pipe_and_data, monkeypatch):
    """CLPS tries every clip on one split per layer (the split does not depend on them)."""
    import clq_triton.quant_linear as ql

    pipe, data = pipe_and_data
    model = copy.deepcopy(pipe.transformer)
    calls = []
    real = ql.lowrank_split
    monkeypatch.setattr(ql, "lowrank_split", lambda *a: calls.append(1) or real(*a))
    report = clq_triton.patch(model, "w4a4", CLQ(lowrank=4, w_clip_grid=(1.0, 0.9, 0.8),
                                                 a_clip_grid=(1.0,)), data, progress=False)
    assert len(calls) == len(report.quantized)


@pytest.mark.parametrize("method", [CLQ(clps=False), SmoothQuant(), RTN(), Hadamard(),
                                    QuaRot(), CLQ(clps=False, lowrank=4), SVDQuant(rank=4)],
                         ids=["clq", "smoothquant", "rtn", "hadamard", "quarot", "clq-4",
                              "svdquant-4"])
def test_one_rank_rule_for_every_method(pipe_and_data, method):
    """QuantConfig(lowrank=4) gives every layer of every method a rank-4 branch, as does a
    method's own rank option alone; the two disagreeing is refused before any work."""
    pipe, data = pipe_and_data
    model = copy.deepcopy(pipe.transformer)
    data = data if method.calibrated else None
    report = clq_triton.patch(model, QuantConfig(lowrank=4), method, data, progress=False)
    layers = [model.get_submodule(n) for n in report.quantized]
    assert layers and all(q.config.lowrank == 4 and q.lowrank_down.shape[1] == 4
                          for q in layers)
    if getattr(method, "rank", 0) or getattr(method, "lowrank", 0):  # its own option
        model = copy.deepcopy(pipe.transformer)
        report = clq_triton.patch(model, "w4a4", method, data, progress=False)
        assert all(model.get_submodule(n).config.lowrank == 4 for n in report.quantized)
        with pytest.raises(ValueError, match="lowrank=8.*set one of them"):
            clq_triton.patch(copy.deepcopy(pipe.transformer), QuantConfig(lowrank=8), method,
                             data, progress=False)


@pytest.mark.parametrize("method", [CLQ(lowrank=1000, w_clip_grid=(1.0, 0.9),
                                        a_clip_grid=(1.0, 0.9)), SVDQuant(rank=1000)],
                         ids=["clq-clps", "svdquant"])
def test_recorded_rank_is_clamped_and_the_checkpoint_loads(pipe_and_data, method, tmp_path):
    """A rank wider than a layer is clamped to min(N, K) in the layer's config too (the clip
    search used to record the asked rank), so the checkpoint loads."""
    pipe, data = pipe_and_data
    model = copy.deepcopy(pipe.transformer)
    report = clq_triton.patch(model, "w4a4", method, data, progress=False)
    for name in report.quantized:
        q = model.get_submodule(name)
        assert q.config.lowrank == min(q.in_features, q.out_features) == \
            q.lowrank_down.shape[1], name
    clq_triton.save_quantized(model, str(tmp_path))
    loaded = clq_triton.load_quantized(str(tmp_path))
    with torch.no_grad():
        for s in data.samples:
            assert torch.equal(output_tensors(run_model(loaded, s, "cpu"))[0],
                               output_tensors(run_model(model, s, "cpu"))[0])
