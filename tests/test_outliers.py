"""The outlier toy: add_outliers keeps the FP function and puts real-DiT-like outliers in."""

import copy

import pytest
import torch

from clq_triton.toy.model import load_tiny_dit
from clq_triton.toy.outliers import add_outliers
from toy_models import planted_dit


@pytest.fixture(scope="module")
def models():
    fp, _ = load_tiny_dit()
    out = copy.deepcopy(fp)
    report = add_outliers(out)
    return fp, out, report


def _inputs(gen, b=6):
    return dict(hidden_states=torch.randn(b, 3, 32, 32, generator=gen),
                timestep=torch.randint(0, 1000, (b,), generator=gen),
                class_labels=torch.randint(0, 49, (b,), generator=gen))


def test_fp_function_is_unchanged(models, gen):
    fp, out, _ = models
    x = _inputs(gen)
    with torch.no_grad():
        want = fp(**x).sample.double()
        got = out(**x).sample.double()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and the shipped loader gives the same transformed model
    loaded, _ = load_tiny_dit(outliers=True)
    for (k, a), (_, b) in zip(out.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def _input_stats(model, x):
    amax, mean, std = {}, {}, {}

    def hook(name):
        def f(mod, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            amax[name], mean[name], std[name] = a.abs().amax(0), a.mean(0), a.std(0)
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if n.startswith("transformer_blocks.2.") and isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(**x)
    for h in handles:
        h.remove()
    return amax, mean, std


def test_outliers_are_where_the_report_says(models, gen):
    fp, out, report = models
    x = _inputs(gen)
    fa, fm, _ = _input_stats(fp, x)
    oa, om, osd = _input_stats(out, x)
    pre = "transformer_blocks.2."
    for key, layer in (("qkv", "attn1.to_q"), ("fc1", "ff.net.0.proj"), ("out", "attn1.to_out.0")):
        for c, alpha in report[2][key]["scale"].items():
            assert 10 <= alpha <= 100
            ratio = float(oa[pre + layer][c] / fa[pre + layer][c])
            assert ratio == pytest.approx(alpha, rel=1e-3)  # channel c scaled by α exactly
        for c, delta in report[2][key]["offset"].items():
            # the same δ in every token: the channel's mean moves by δ, its spread does not
            assert 10 <= abs(delta) <= 30
            assert float(om[pre + layer][c] - fm[pre + layer][c]) == pytest.approx(delta,
                                                                                  rel=1e-4)
            assert abs(float(om[pre + layer][c])) > 3 * float(osd[pre + layer][c])
    # the untouched channels keep their range: the outliers stand 10-100x above the median
    q = oa[pre + "attn1.to_q"]
    assert q.max() > 10 * q.median()


def test_seeds_differ_and_wrong_model_raises():
    a, _ = load_tiny_dit()
    b = copy.deepcopy(a)
    ra, rb = add_outliers(a, seed=0), add_outliers(b, seed=1)
    assert ra[0]["qkv"]["scale"] != rb[0]["qkv"]["scale"]
    with pytest.raises(TypeError, match="ada_norm_zero"):
        add_outliers(torch.nn.Module())  # no transformer_blocks
    model = planted_dit(0)
    model.transformer_blocks[0].norm1 = torch.nn.LayerNorm(64)
    with pytest.raises(TypeError, match="ada_norm_zero"):
        add_outliers(model)
