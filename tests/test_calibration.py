"""CLQ calibration (CBC, OBS, CLPS), baselines and save/load, on small diffusers models.

Calibration replays models many times, so these tests use the PyTorch reference kernels
(backend "torch"); the Triton kernels themselves are tested in the kernel test files.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import clq_triton
from clq_triton import CLQ, CalibrationData, QuantConfig, QuantLinear, QuaRot, SmoothQuant
from clq_triton.blocks import block_inputs, find_blocks, output_tensors, run_model
from clq_triton.kernels.hadamard import find_perm_runs, rotate_ref
from clq_triton.smoothing import outlier_permutation
from diffusers_models import MODELS
from toy_models import dit_pipeline, planted_dit, sample


@pytest.fixture(autouse=True)
def torch_backend():
    with clq_triton.backend("torch"):
        yield


def model_error(model, ref_model, data, device="cpu"):
    num = den = 0.0
    for s in data.samples:
        want = output_tensors(run_model(ref_model, s, device))[0].float()
        got = output_tensors(run_model(model, s, device))[0].float()
        num += float((got - want).pow(2).sum())
        den += float(want.pow(2).sum())
    return (num / den) ** 0.5


# ---------------------------------------------------------------- capture


def test_capture_records_each_sampler_step(pipe_and_data):
    pipe, data = pipe_and_data
    assert len(data) == 4  # 4 steps, classifier-free guidance batched in one call
    timesteps = [int(kw["timestep"].flatten()[0]) for _, kw in data.samples]
    assert len(set(timesteps)) == 4
    assert all(t.device.type == "cpu" for a, _ in data.samples for t in a)


def test_capture_every_and_max_samples_bound_memory():
    pipe = dit_pipeline(seed=2, layers=1)
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    data = clq_triton.capture_calibration(pipe.transformer, lambda: sample(pipe, [0], steps=6),
                                          every=2, max_samples=2, progress=False)
    h.remove()
    assert len(data) == 2 and len(calls) == 3  # stopped after the 3rd call (kept 1st, 3rd)
    with pytest.raises(RuntimeError, match="never called"):
        clq_triton.capture_calibration(pipe.transformer, lambda: None, progress=False)


# ---------------------------------------------------------------- blocks / CBC


def test_find_blocks_in_execution_order(gen):
    model, inputs = MODELS["flux"](gen)
    names = [n for n, _ in find_blocks(model.eval(), ((), inputs), "cpu")]
    assert names == ["transformer_blocks.0", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]
    with pytest.raises(ValueError, match="no block list"):
        find_blocks(nn.Sequential(nn.Linear(64, 64)), ((torch.randn(1, 64),), {}), "cpu")


def test_cbc_inputs_differ_from_fp_and_result_no_worse(pipe_and_data):
    pipe, data = pipe_and_data
    fp = pipe.transformer
    blocks = [b for _, b in find_blocks(fp, data.samples[0], "cpu")]
    fp_in = block_inputs(fp, blocks[1], data, "cpu")
    cbc = copy.deepcopy(fp)
    clq_triton.patch(cbc, "w4a4", CLQ(), data, progress=False)
    no_cbc = copy.deepcopy(fp)
    clq_triton.patch(no_cbc, "w4a4", CLQ(cbc=False), data, progress=False)
    # block 1 of the CBC model is fed by quantized block 0: its inputs are not the FP ones
    q_in = block_inputs(cbc, dict(cbc.named_modules())["transformer_blocks.1"], data, "cpu")
    assert not torch.equal(q_in[0][0][0], fp_in[0][0][0])
    e_cbc, e_fp = model_error(cbc, fp, data), model_error(no_cbc, fp, data)
    print(f"W4A4 output error: CBC {e_cbc:.4f}, FP-input calibration {e_fp:.4f}")
    assert e_cbc <= 1.1 * e_fp


# ---------------------------------------------------------------- OBS


@pytest.mark.parametrize("run", [1, 8])
def test_outlier_permutation_deals_outliers_over_blocks(gen, run):
    """Outliers in distinct runs of ``run`` channels land in distinct Hadamard blocks; each
    run moves whole and in order (16-byte loads in the kernel: find_perm_runs)."""
    score = torch.rand(256, generator=gen)
    top = torch.randperm(256 // 8, generator=gen)[:4] * 8 + torch.randint(8, (4,), generator=gen)
    score[top] = 100 + torch.arange(4.0)
    perm = outlier_permutation(score, 64, run)
    assert torch.equal(torch.sort(perm.long()).values, torch.arange(256))
    blocks_of_top = {int((perm.long() == c).nonzero()) // 64 for c in top}
    assert blocks_of_top == {0, 1, 2, 3}
    if run == 8:
        assert find_perm_runs(perm) == 8
        runs = perm.long().view(-1, 8)
        assert torch.equal(runs - runs[:, :1], torch.arange(8).expand(32, 8))
        assert bool((runs[:, 0] % 8 == 0).all())
        # the runs are ranked by their highest score and dealt round-robin: run r → block r % 4
        ranked = torch.argsort(score.view(-1, 8).amax(1), descending=True, stable=True)
        assert torch.equal(runs[:, 0].view(4, 8).T.flatten() // 8, ranked)


def test_outlier_permutation_of_single_channels_is_the_plain_deal():
    """run=1 (and runs that do not divide the block): channel r of the ranking goes to block
    r % blocks, position r // blocks in it."""
    score = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 2.0, 8.0] * 4)
    want = torch.argsort(score, descending=True, stable=True).view(-1, 2).T.flatten()
    assert torch.equal(outlier_permutation(score, 16, run=1).long(), want)
    assert torch.equal(outlier_permutation(score, 16, run=32).long(), want)


def test_obs_rotation_is_exact_in_full_precision(gen):
    k, n = 256, 48
    x = torch.randn(20, k, generator=gen, dtype=torch.float64)
    x[:, :4] *= 50
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    perm = outlier_permutation(x.abs().amax(0), 64)
    y = rotate_ref(x, perm, 64) @ rotate_ref(w, perm, 64).T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-12, atol=1e-9)


class _OneLayer(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(256, 64)])
        with torch.no_grad():
            self.blocks[0].weight.copy_(torch.randn(64, 256, generator=gen) / 16)

    def forward(self, x):
        return self.blocks[0](x)


def test_obs_beats_rtn_and_full_hadamard_on_planted_outliers(gen):
    model = _OneLayer(gen).eval()
    xs = []
    for _ in range(4):
        x = torch.randn(32, 256, generator=gen)
        x[:, :4] *= 30  # outlier channels, all in the first Hadamard block
        xs.append(dict(x=x))
    data = CalibrationData.from_inputs(xs)
    errs = {}
    for name, method in {"rtn": "rtn", "quarot": "quarot", "obs": CLQ(clps=False)}.items():
        m = copy.deepcopy(model)
        clq_triton.patch(m, QuantConfig(hadamard_block=64), method,
                         data if name == "obs" else None, progress=False)
        errs[name] = model_error(m, model, data)
    print("planted-outlier layer, W4A4 error:", {k: round(v, 4) for k, v in errs.items()})
    assert errs["obs"] < errs["quarot"] < errs["rtn"]


# ---------------------------------------------------------------- CLPS


def test_clps_lowers_downstream_error(pipe_and_data):
    pipe, data = pipe_and_data
    fp = pipe.transformer
    errs, chosen = {}, {}
    for name, method in {"clps": CLQ(), "none": CLQ(clps=False)}.items():
        m = copy.deepcopy(fp)
        clq_triton.patch(m, "w4a4", method, data, progress=False)
        errs[name] = model_error(m, fp, data)
        chosen[name] = {(q.config.w_clip, q.config.a_clip) for q in m.modules()
                        if isinstance(q, QuantLinear)}
    print(f"W4A4 output error: CLPS {errs['clps']:.4f}, no search {errs['none']:.4f}; "
          f"chosen clips {sorted(chosen['clps'])}")
    assert chosen["clps"] != {(1.0, 1.0)}
    assert chosen["none"] == {(1.0, 1.0)}  # CLQ(clps=False) really runs no search
    assert errs["clps"] < errs["none"]


def test_clps_block_target_beats_layer_target(pipe_and_data):
    pipe, data = pipe_and_data
    fp = pipe.transformer
    errs = {}
    for target in ("block", "layer"):
        m = copy.deepcopy(fp)
        clq_triton.patch(m, "w4a4", CLQ(clps_target=target), data, progress=False)
        errs[target] = model_error(m, fp, data)
    print(f"W4A4 output error by CLPS target: {errs}")
    assert errs["block"] < errs["layer"]


# ---------------------------------------------------------------- methods, pipeline, errors


@pytest.mark.parametrize("bits", ["w4a4", "w4a8", "w8a8"])
def test_every_method_runs_in_the_pipeline(bits):
    pipe = dit_pipeline(seed=3, layers=1)
    data = clq_triton.capture_calibration(pipe.transformer, lambda: sample(pipe, [2], steps=2),
                                          progress=False)
    fp_images = sample(pipe, [4], steps=2)
    fp = pipe.transformer
    for name, cls in clq_triton.METHODS.items():
        method = cls(w_clip_grid=(1.0, 0.9), a_clip_grid=(1.0, 0.9)) if cls is CLQ else name
        pipe.transformer = copy.deepcopy(fp)
        report = clq_triton.patch(pipe.transformer, bits, method,
                                  data if cls().calibrated else None, progress=False)
        assert report.method.name == name
        assert len(report.quantized) == 6
        images = sample(pipe, [4], steps=2)
        assert images.shape == fp_images.shape and np.isfinite(images).all()
    pipe.transformer = fp


def test_calibration_errors():
    model = planted_dit(0, layers=1)
    with pytest.raises(ValueError, match="needs calibration data"):
        clq_triton.patch(model, method="clq", progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        clq_triton.patch(model, method=SmoothQuant(alpha=0.7), progress=False)
    with pytest.raises(ValueError, match="method must be a clq_triton method config or one"):
        clq_triton.patch(model, method="gptq", progress=False)
    with pytest.raises(ValueError, match="clps_target"):
        CLQ(clps_target="deep")
    with pytest.raises(ValueError, match="clip ratios"):
        CLQ(a_clip_grid=(1.2,))
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(alpha=1.5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_clq_calibrates_every_architecture(name, gen):
    """CBC + OBS + CLPS on each small diffusers transformer (two recorded calls)."""
    model, inputs = MODELS[name](gen)
    model = model.eval()
    _, inputs2 = MODELS[name](gen)
    data = CalibrationData.from_inputs([inputs, inputs2])
    fp = copy.deepcopy(model)
    report = clq_triton.patch(model, "w4a4", CLQ(w_clip_grid=(1.0, 0.9), a_clip_grid=(1.0, 0.9)),
                              data, progress=False)
    assert report.quantized and not report.skipped
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in report.quantized)
    # every layer permutes its input but the MLPs' second layers, whose permutation moved
    # into the first layer's output rows (clq_triton.fold)
    assert report.folded and set(report.folded) < set(report.quantized)
    assert all((model.get_submodule(n).perm is None) == (n in report.folded)
               for n in report.quantized)
    err = model_error(model, fp, data)
    print(f"{name}: CLQ W4A4 output error on its calibration inputs {err:.4f}")
    assert err < 0.5


class _Twice(nn.Module):
    """Block 0 is called twice per forward, on differently offset inputs (mean ~0.5, then
    ~3.5); block 1 once."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 64)),
                                     nn.Sequential(nn.Linear(64, 64))])

    def forward(self, x):
        a = self.blocks[0](x + 0.5)
        b = self.blocks[0](x + 3.5)
        return self.blocks[1](a + b)


def test_a_block_called_twice_is_calibrated_on_both_calls(gen):
    """OBS's shift is the channel mean over every call of the block, not the first call's;
    the repeat is reported."""
    model = _Twice().eval()
    xs = [torch.randn(16, 64, generator=gen) for _ in range(3)]
    data = CalibrationData.from_inputs([dict(x=x) for x in xs])
    with pytest.warns(UserWarning, match=r"blocks.0 \(2×\).*all of its calls"):
        clq_triton.patch(model, QuantConfig(group_size=None), CLQ(clps=False), data,
                         progress=False)
    every = torch.cat([x + 0.5 for x in xs] + [x + 3.5 for x in xs])
    torch.testing.assert_close(model.blocks[0][0].channel_shift, every.mean(0))
    assert model.blocks[1][0].channel_shift is not None


@pytest.mark.parametrize("target", ["block", "depth"])
def test_a_block_called_twice_calibrates_against_fp_targets(gen, target):
    """With the repeated block the links around it are replays; CLPS's FP targets come from
    the FP model (its quantized layers lent back), so both blocks calibrate and the error
    is small."""
    model = _Twice().eval()
    fp = copy.deepcopy(model)
    data = CalibrationData.from_inputs([dict(x=torch.randn(16, 64, generator=gen))
                                        for _ in range(2)])
    with pytest.warns(UserWarning, match="more than once"):
        clq_triton.patch(model, "w8a8", CLQ(clps_target=target, w_clip_grid=(1.0, 0.9),
                                            a_clip_grid=(1.0,)), data, progress=False)
    assert model_error(model, fp, data) < 0.02


def test_clq_without_a_rotation_keeps_shift_and_smoothing(gen):
    """QuantConfig(hadamard_block=None): the permutation is skipped with a warning, the shift
    and smoothing still apply."""
    model = planted_dit(0, layers=1)
    data = CalibrationData.from_inputs([dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=gen), timestep=torch.tensor([500]),
        class_labels=torch.tensor([1]))])
    cfg = QuantConfig(w_bits=4, a_bits=4, group_size=64, hadamard_block=None)
    with pytest.warns(UserWarning, match="permutation and rotation need a Hadamard block"):
        report = clq_triton.patch(model, cfg, CLQ(clps=False), data, progress=False)
    layers = [model.get_submodule(n) for n in report.quantized]
    assert all(q.perm is None and q.config.hadamard_block is None for q in layers)
    assert all(q.channel_shift is not None and q.channel_scale is not None for q in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [CLQ(w_clip_grid=(1.0, 0.9), a_clip_grid=(1.0, 0.9)),
                                    CLQ(clps_target="layer", w_clip_grid=(1.0, 0.9)),
                                    CLQ(clps_target="depth", clps_depth=1),
                                    CLQ(clps_target="output", w_clip_grid=(1.0,)),
                                    CLQ(cbc=False), SmoothQuant()], ids=repr)
def test_calibration_and_patch_of_a_cuda_model(method):
    """Every calibrated method on a model living on the GPU (statistics reduced there, the
    channel transforms placed on the weights' device); same layers as on the CPU."""
    pipe = dit_pipeline(seed=4, layers=2)
    data = clq_triton.capture_calibration(pipe.transformer, lambda: sample(pipe, [1], steps=2),
                                          progress=False)
    fp = pipe.transformer.cuda()
    model = copy.deepcopy(fp)
    with clq_triton.backend("auto"):
        report = clq_triton.patch(model, "w4a4", method, data, progress=False)
        assert report.quantized
        for n in report.quantized:
            assert all(t.is_cuda for t in model.get_submodule(n).state_dict().values()
                       if torch.is_tensor(t))
        err = model_error(model, fp, data, "cuda")
    assert err < 0.5



def test_capture_spreads_samples_over_every_step():
    """calls=: the samples are spread over the whole run, first and last step included."""
    from clq_triton.capture import spread

    assert spread(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert spread(3, 8) == [0, 1, 2] and spread(9, 1) == [0]
    pipe = dit_pipeline(seed=2, layers=1)
    steps = []
    h = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: steps.append(int(kw["timestep"].flatten()[0])), with_kwargs=True)
    sample(pipe, [0], steps=6)
    h.remove()
    data = clq_triton.capture_calibration(pipe.transformer, lambda: sample(pipe, [0], steps=6),
                                          max_samples=3, calls=6, progress=False)
    got = [int(kw["timestep"].flatten()[0]) for _, kw in data.samples]
    assert got == [steps[0], steps[2], steps[5]]
    with pytest.warns(UserWarning, match="expected 9 transformer calls but run\\(\\) made 6"):
        clq_triton.capture_calibration(pipe.transformer, lambda: sample(pipe, [0], steps=6),
                                       max_samples=3, calls=9, progress=False)


def test_cli_calibration_sees_the_last_sampler_steps():
    """clq-triton quantize --steps 6 --calib-samples 3 calibrates on steps 0, 2 and 5, not on
    the first three only (the late, low-noise steps were never seen)."""
    from clq_triton import cli

    pipe = dit_pipeline(seed=2, layers=1)
    steps = []
    h = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: steps.append(int(kw["timestep"].flatten()[0])), with_kwargs=True)
    cli.generate(pipe, ["1"], 6, seed=1)
    h.remove()
    data = cli.calibrate_pipeline(pipe, ["1"], 6, 3, cli.Timer())
    assert [int(kw["timestep"].flatten()[0]) for _, kw in data.samples] == \
        [steps[0], steps[2], steps[5]]


def test_gptq_option_lowers_the_error_of_calibrated_methods(pipe_and_data):
    """CLQ(gptq=True) / SmoothQuant(gptq=True) / QuaRot(gptq=True): the same layers, scales
    and storage, codes rounded by GPTQ on the calibration inputs' Hessian in each layer's
    basis; the model's W4A8 error on those inputs drops. QuaRot without GPTQ is data-free."""
    pipe, data = pipe_and_data
    fp = pipe.transformer
    for method in (CLQ(clps=False), SmoothQuant(), QuaRot()):
        errs = {}
        for gptq in (False, True):
            m = copy.deepcopy(fp)
            clq_triton.patch(m, "w4a8", type(method)(**{**method.__dict__, "gptq": gptq}),
                             data if gptq or method.calibrated else None, progress=False)
            errs[gptq] = model_error(m, fp, data)
        print(f"{method.name} W4A8 error: RTN {errs[False]:.4f}, GPTQ {errs[True]:.4f}")
        assert errs[True] < errs[False]
    assert clq_triton.methods.method_from_dict(CLQ(gptq=True).to_dict()).gptq


def test_cli_calibration_noise_is_per_prompt_whatever_the_batch():
    """clq-triton quantize --calib-batch B: prompt i starts from its own noise (seed 1 + i),
    the same for any B; B = 1 no longer starts every prompt from one latent."""
    from clq_triton import cli

    pipe = dit_pipeline(seed=2, layers=1)
    prompts = ["1", "4", "1"]  # the same class twice: only the noise tells them apart

    def first_latents(batch):
        data = cli.calibrate_pipeline(pipe, prompts, 3, 1, cli.Timer(), batch)
        rows = [args[0] for args, _ in data.samples]  # [2 b, ...]: guidance doubles
        return torch.cat([r[:len(r) // 2] for r in rows])

    one, two, all_ = first_latents(1), first_latents(2), first_latents(None)
    assert len(one) == 3 and torch.equal(one, two) and torch.equal(one, all_)
    assert not torch.equal(one[0], one[2]) and not torch.equal(one[0], one[1])
