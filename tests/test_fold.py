"""Input permutations folded into the producing layer (clq_triton.fold): exact on single
layers, on every diffusers FeedForward activation and in a patched model, for both backends;
checkpoints of folded models."""

import copy
import importlib

import pytest
import torch
from diffusers.models.attention import FeedForward
from torch import nn

import clq_triton
from clq_triton import CLQ, QuantConfig, QuantLinear
from clq_triton.fold import fold_permutations, mlp_pairs
from diffusers_models import MODELS, output

CONFIGS = [QuantConfig(hadamard_block=64),
           QuantConfig(group_size=64, hadamard_block=32, lowrank=4),
           QuantConfig.from_bits("w8a8").replace(hadamard_block=64)]


def _layer(k, n, config, gen, perm=True):
    """A QuantLinear with a random permutation, shift and multiplier (CLQ's transform)."""
    lin = nn.Linear(k, n)
    return QuantLinear.from_linear(
        lin, config, perm=torch.randperm(k, generator=gen) if perm else None,
        channel_scale=torch.rand(k, generator=gen) + 0.5,
        channel_shift=torch.randn(k, generator=gen))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("config", CONFIGS, ids=["w4a4", "w4a4-g64-lowrank", "w8a8"])
def test_permuted_input_and_permuted_outputs_compute_the_same(gen, config, backend):
    """consumer(x) == folded consumer(x[:, perm]) (bit for bit without a low-rank branch),
    and the producer's reordered rows give its old outputs reordered; the caches built before
    the fold follow it."""
    with clq_triton.backend(backend):
        consumer = _layer(128, 48, config, gen)
        x = torch.randn(5, 128, generator=gen) * 3
        want = consumer(x)
        folded = copy.deepcopy(consumer)
        perm = folded.take_permuted_input()
        assert torch.equal(perm, consumer.perm) and folded.perm is None
        got = folded(x[:, perm.long()])
        if config.lowrank:  # x·down sums in the new order: rounding may differ
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want)
        assert torch.allclose(folded.dequantized_weight(),
                              consumer.dequantized_weight()[:, perm.long()])
        assert folded.take_permuted_input() is None  # nothing left to take

        producer = _layer(64, 128, config, gen).use_int8_operands().cache_dequantized_weight()
        h = torch.randn(7, 64, generator=gen)
        before = producer(h)
        producer.permute_outputs(perm)
        assert torch.allclose(producer(h), before[:, perm.long()], rtol=1e-6, atol=1e-6)
        cached_int8, cached_w = producer.qweight_int8, producer.weight_dequantized
        if cached_int8 is not None:  # W8A8 layers keep no copy
            assert torch.equal(cached_int8, producer.use_int8_operands().qweight_int8)
        assert torch.equal(cached_w, producer._rotated_weight())


def test_permute_outputs_refuses_what_is_not_a_permutation_or_segmented(gen):
    q = _layer(64, 32, QuantConfig(hadamard_block=64), gen)
    with pytest.raises(ValueError):
        q.permute_outputs(torch.zeros(32, dtype=torch.long))
    segmented = _layer(64, 32, QuantConfig(hadamard_block=64,
                                           w_clip_segments=((16, 1.0), (16, 0.9))), gen)
    with pytest.raises(ValueError, match="segment"):
        segmented.permute_outputs(torch.randperm(32, generator=gen))


@pytest.mark.parametrize("activation", ["gelu", "gelu-approximate", "geglu", "geglu-approximate",
                                        "swiglu", "linear-silu"])
def test_every_feedforward_activation_folds_exactly(gen, activation):
    with clq_triton.backend("torch"):
        ff = FeedForward(64, mult=2, activation_fn=activation).eval()
        def quantized(lin):
            k = lin.in_features
            return QuantLinear.from_linear(lin, QuantConfig(hadamard_block=64),
                                           perm=torch.randperm(k, generator=gen),
                                           channel_shift=torch.randn(k, generator=gen) * 0.1)

        ff.net[0].proj = quantized(ff.net[0].proj)
        ff.net[2] = quantized(ff.net[2])
        x = torch.randn(2, 9, 64, generator=gen)
        with torch.no_grad():
            want = ff(x)
            assert mlp_pairs(ff) == [("net.0.proj", "net.2",
                                      activation in ("geglu", "swiglu"))]
            assert fold_permutations(ff) == ["net.2"]
            assert ff.net[2].perm is None and ff.net[0].proj.perm is not None
            torch.testing.assert_close(ff(x), want, rtol=1e-5, atol=1e-5)
            assert fold_permutations(ff) == []  # a second fold finds nothing to move


def test_a_feedforward_with_a_full_precision_layer_is_left_alone(gen):
    ff = FeedForward(64, mult=2)
    ff.net[2] = QuantLinear.from_linear(ff.net[2], QuantConfig(hadamard_block=64),
                                        perm=torch.randperm(128, generator=gen))
    assert mlp_pairs(ff) == [] and fold_permutations(ff) == []
    assert ff.net[2].perm is not None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_clq_models_fold_every_mlp_and_keep_their_output(name, gen, monkeypatch):
    """Each FeedForward of each architecture folds once; the folded model's output is the
    unfolded one's (same calibration) on the reference path and in the kernels."""
    fp, inputs = MODELS[name](gen)
    fp.eval()
    feedforwards = [n for n, m in fp.named_modules() if isinstance(m, FeedForward)]
    patch_module = importlib.import_module("clq_triton.patch")
    monkeypatch.setattr(patch_module, "fold_permutations", lambda model: [])
    model = copy.deepcopy(fp)
    with clq_triton.backend("torch"):
        clq_triton.patch(model, "w4a4", CLQ(clps=False), clq_triton.CalibrationData.from_inputs(
            [inputs]), progress=False)
    unfolded = copy.deepcopy(model)
    folded = fold_permutations(model)
    assert folded == [f"{n}.net.2" for n in feedforwards] and folded
    for backend in ("torch", "triton"):
        with clq_triton.backend(backend), torch.no_grad():
            torch.testing.assert_close(output(model, inputs), output(unfolded, inputs),
                                       rtol=1e-4, atol=1e-5)


def test_patch_reports_the_fold_and_the_checkpoint_loads_folded(gen, tmp_path):
    fp, inputs = MODELS["pixart"](gen)
    fp.eval()
    model = copy.deepcopy(fp)
    with clq_triton.backend("torch"):
        report = clq_triton.patch(model, "w4a8", CLQ(clps=False),
                                  clq_triton.CalibrationData.from_inputs([inputs]),
                                  progress=False)
        assert report.folded == [f"transformer_blocks.{i}.ff.net.2" for i in range(2)]
        permuted = {n for n, m in model.named_modules()
                    if isinstance(m, QuantLinear) and m.perm is not None}
        assert permuted == set(report.quantized) - set(report.folded)
        with torch.no_grad():
            want = output(model, inputs)
        clq_triton.save_quantized(model, str(tmp_path))
        for target in (None, copy.deepcopy(fp)):
            loaded = clq_triton.load_quantized(str(tmp_path), target)
            assert loaded.get_submodule(report.folded[0]).perm is None
            with torch.no_grad():
                assert torch.equal(output(loaded, inputs), want)


def test_an_unfolded_checkpoint_loads_folded(gen, tmp_path, monkeypatch):
    """Checkpoints saved before patch folded the MLPs' permutations fold on load, exactly."""
    fp, inputs = MODELS["dit"](gen)
    fp.eval()
    monkeypatch.setattr(importlib.import_module("clq_triton.patch"), "fold_permutations",
                        lambda model: [])
    with clq_triton.backend("torch"):
        clq_triton.patch(fp, "w4a4", CLQ(clps=False),
                         clq_triton.CalibrationData.from_inputs([inputs]), progress=False)
        assert all(m.perm is not None for m in fp.modules() if isinstance(m, QuantLinear))
        clq_triton.save_quantized(fp, str(tmp_path))
        loaded = clq_triton.load_quantized(str(tmp_path))
        assert [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)
                and m.perm is None] == [f"transformer_blocks.{i}.ff.net.2" for i in range(2)]
        with torch.no_grad():
            torch.testing.assert_close(output(loaded, inputs), output(fp, inputs),
                                       rtol=1e-4, atol=1e-5)


def test_clq_with_runs_of_8_gives_layers_that_read_runs(gen):
    """CLQ(perm_run=8): every layer that keeps a permutation has one of aligned runs of 8 and
    launches the kernel's run path; the MLPs' still fold."""
    fp, inputs = MODELS["pixart"](gen)
    fp.eval()
    model = copy.deepcopy(fp)
    with clq_triton.backend("torch"):
        report = clq_triton.patch(model, "w4a4", CLQ(clps=False, perm_run=8),
                                  clq_triton.CalibrationData.from_inputs([inputs]),
                                  progress=False)
        layers = {n: model.get_submodule(n) for n in report.quantized}
        assert report.folded and all(layers[n].perm is None for n in report.folded)
        kept = [q for n, q in layers.items() if n not in report.folded]
        assert kept and all(q._perm_runs == 8 for q in kept)
        with torch.no_grad():
            want = output(fp, inputs)
            err = float((output(model, inputs) - want).norm() / want.norm())
        assert err < 0.2, err


class NormFormerMLP(nn.Module):
    """A user MLP, its class named like diffusers' (NormFormer-style): an affine LayerNorm between the
    activation and the second layer, which a permutation of the hidden channels changes."""

    def __init__(self, dim, hidden):
        super().__init__()
        from diffusers.models.activations import GELU

        self.net = nn.ModuleList([GELU(dim, hidden), nn.Dropout(0.0), nn.Linear(hidden, dim)])
        self.norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.norm.weight.uniform_(0.1, 3.0)
            self.norm.bias.normal_()

    def forward(self, x):
        return self.net[2](self.norm(self.net[0](x)))


NormFormerMLP.__name__ = NormFormerMLP.__qualname__ = "FeedForward"


class Stack(nn.Module):
    def __init__(self, *mlps):
        super().__init__()
        self.blocks = nn.ModuleList(mlps)

    def forward(self, hidden_states):
        for mlp in self.blocks:
            hidden_states = hidden_states + mlp(hidden_states)
        return hidden_states


def test_only_diffusers_feedforward_is_folded(gen):
    """A module named FeedForward of another class, and diffusers' FeedForward with a foreign
    activation, keep their permutation (reported in PatchReport.unfolded); the patched
    model's output is the one without any fold."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    custom = FeedForward(64, mult=2, activation_fn="linear-silu")
    custom.net[0].activation = nn.LayerNorm(128)  # not elementwise
    model = Stack(NormFormerMLP(64, 128), custom, FeedForward(64, mult=2)).eval()
    x = torch.randn(2, 7, 64, generator=gen) * 2
    data = clq_triton.CalibrationData.from_inputs([dict(hidden_states=x)])
    patch_module = importlib.import_module("clq_triton.patch")
    with clq_triton.backend("torch"), torch.no_grad():
        unfolded = copy.deepcopy(model)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(patch_module, "fold_permutations", lambda m: [])
            clq_triton.patch(unfolded, "w8a8", CLQ(clps=False), data, progress=False)
        report = clq_triton.patch(model, "w8a8", CLQ(clps=False), data, progress=False)
        torch.testing.assert_close(model(x), unfolded(x), rtol=1e-5, atol=1e-5)
        assert report.folded == ["blocks.2.net.2"]
        assert sorted(report.unfolded) == ["blocks.0", "blocks.1"], report.unfolded
        assert "not diffusers' FeedForward" in report.unfolded["blocks.0"]
        assert "LinearActivation applies LayerNorm" in report.unfolded["blocks.1"]
        assert "permutation not folded: blocks.0" in report.summary()
        assert model.blocks[0].net[2].perm is not None
