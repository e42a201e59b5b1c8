"""Fused projections (patch(..., fuse_projections=True)): function-preserving on every
architecture, one activation pass and one GEMM per distinct quantized input, calibration and
checkpoints of fused models."""

import copy
import importlib
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import clq_triton
from clq_triton import CLQ, QuantConfig, QuantLinear
from clq_triton.calibrate import _best_clips
from clq_triton.fuse import SharedOutput, fuse_projections, segments
from clq_triton.methods import ChannelTransform
from diffusers_models import MODELS, output


@pytest.fixture(autouse=True)
def torch_backend():
    with clq_triton.backend("torch"):
        yield


class OpCount(TorchDispatchMode):
    """Counts the package's two operators by name while active."""

    def __init__(self):
        super().__init__()
        self.counts = {"rotate_quantize": 0, "quant_matmul": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("clq_triton::"):
            op = name.split("::")[1].split(".")[0]
            self.counts[op] = self.counts.get(op, 0) + 1
        return func(*args, **(kwargs or {}))


def _linears(model):
    return sum(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fusion_preserves_the_function_and_drops_unfused_layers(name, gen):
    model, inputs = MODELS[name](gen)
    model.eval()
    with torch.no_grad():
        want = output(model, inputs)
    n = _linears(model)
    # fused name → the layers it replaces (relative to its parent) and their out_features
    table = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v")),
             ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
             ("to_qkv_mlp", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")))

    def linear(m, path):
        for p in path.split("."):
            m = getattr(m, p, None)
        return m if isinstance(m, nn.Linear) else None

    parts = {f"{name}.{new}": (old, tuple(linear(m, o).out_features for o in old))
             for name, m in model.named_modules() for new, old in table
             if all(linear(m, o) is not None for o in old)}
    fused = fuse_projections(model)
    assert fused and all(type(model.get_submodule(f)) is nn.Linear for f in fused)
    for f in fused:  # it knows the out_features of the layers it replaced, which are gone
        old, sizes = parts[f]
        assert segments(model.get_submodule(f)) == sizes, f
        parent = model.get_submodule(f.rpartition(".")[0])
        assert all(linear(parent, o) is None for o in old), f  # no dead FP weights
    assert _linears(model) == n - sum(len(parts[f][0]) - 1 for f in fused)
    if name == "flux":  # single blocks: q/k/v and the MLP's input projection are one layer
        assert sum(f.endswith("to_qkv_mlp") for f in fused) == 2
    with torch.no_grad():
        torch.testing.assert_close(output(model, inputs), want, rtol=0, atol=1e-6)
    assert fuse_projections(model) == []  # already fused: a no-op




@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_activation_pass_per_distinct_input(name, gen):
    """Fused: every block forward makes as many rotate_quantize and quant_matmul calls as
    its QuantLinears read distinct tensors (counted by identity in pre-hooks; blocks that
    read the same caption in cross-attention have different weights, so they count apart)."""
    counts = {}
    for fuse in (False, True):
        model, inputs = MODELS[name](gen)
        model.eval()
        report = clq_triton.patch(model, QuantConfig(group_size=None), progress=False,
                                  fuse_projections=fuse)
        assert bool(report.fused) == fuse
        seen = []  # (block, input) per QuantLinear call
        hooks = [m.register_forward_pre_hook(
            lambda m, a, block=".".join(n.split(".")[:2]): seen.append((block, a[0])))
            for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        with torch.no_grad(), OpCount() as ops:
            output(model, inputs)
        for h in hooks:
            h.remove()
        distinct = [(b, t) for i, (b, t) in enumerate(seen)
                    if not any(b == c and t is u for c, u in seen[:i])]
        assert ops.counts["rotate_quantize"] == ops.counts["quant_matmul"] == len(seen)
        if fuse:
            assert len(seen) == len(distinct)
        counts[fuse] = len(seen)
    print(f"{name}: activation passes per forward {counts[False]} -> {counts[True]}")
    assert counts[True] < counts[False]


def test_pixart_block_passes_ten_to_seven(gen):
    """PixArt: self-attention q/k/v → one, cross-attention k/v → one: 10 → 7 per block."""
    model, inputs = MODELS["pixart"](gen)
    clq_triton.patch(model.eval(), "w4a4", progress=False, fuse_projections=True)
    with torch.no_grad(), OpCount() as ops:
        output(model, inputs)
    assert ops.counts["rotate_quantize"] == 7 * len(model.transformer_blocks)


def test_fused_clq_calibrates_and_round_trips(gen, tmp_path):
    """CLQ calibrates a fused PixArt (one transform per fused layer); the checkpoint records
    the fusion and loads bit for bit, built from config.json or into the FP model."""
    fp, inputs = MODELS["pixart"](gen)
    fp.eval()
    model = copy.deepcopy(fp)
    data = clq_triton.CalibrationData.from_inputs([inputs])
    report = clq_triton.patch(model, "w4a8", CLQ(w_clip_grid=(1.0, 0.7), a_clip_grid=(1.0,)),
                              data, progress=False, fuse_projections=True)
    assert "transformer_blocks.0.attn1.to_qkv" in report.quantized
    assert not any(n.endswith(("to_q", "to_k", "to_v")) and "attn1" in n
                   for n in report.quantized)
    qkv = model.get_submodule("transformer_blocks.0.attn1.to_qkv")
    assert qkv.out_features == 3 * model.get_submodule(
        "transformer_blocks.0.attn1.to_out.0").in_features and qkv.perm is not None
    with torch.no_grad():
        want = output(model, inputs)
        err = float((want - output(fp, inputs)).norm() / output(fp, inputs).norm())
    assert err < 0.2, err
    clq_triton.save_quantized(model, str(tmp_path))
    for target in (None, copy.deepcopy(fp)):
        loaded = clq_triton.load_quantized(str(tmp_path), target)
        with torch.no_grad():
            assert torch.equal(output(loaded, inputs), want)
        configs = {n: m.config for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
        assert configs == {n: m.config for n, m in model.named_modules()
                           if isinstance(m, QuantLinear)}  # w_clip_segments included
    assert os.path.exists(tmp_path / "config.json")


def test_fusing_a_model_without_attention_warns(gen):
    model = nn.Sequential(nn.ModuleList([nn.Linear(64, 64)]))
    model.forward = lambda x: model[0][0](x)
    with pytest.warns(UserWarning, match="nothing was fused"):
        clq_triton.patch(model, "w4a4", progress=False, fuse_projections=True)


def test_clip_search_refines_each_segment_of_a_fused_layer(gen):
    """CLPS on a fused layer: the shared (w_clip, a_clip) grid search, then one w_clip per
    output segment. With a score that is separable per segment, the search must land on
    each segment's own best clip; an unfused layer keeps one clip."""
    lin = nn.Linear(64, 48)
    method = CLQ(w_clip_grid=(1.0, 0.9, 0.8, 0.7), a_clip_grid=(1.0, 0.9))
    best = {16: 0.7, 8: 1.0, 24: 0.9}  # segment rows → the clip its score prefers

    def score(q):
        cfg = q.config
        clips = cfg.w_clip_segments or tuple((r, cfg.w_clip) for r in best)
        return sum((c - best[r]) ** 2 for r, c in clips) + (cfg.a_clip - 0.9) ** 2

    cfg = QuantConfig(group_size=None)
    setattr(lin, "_clq_segments", (16, 8, 24))
    q = _best_clips(lin, cfg, ChannelTransform(), method, score)
    assert q.config.w_clip_segments == ((16, 0.7), (8, 1.0), (24, 0.9))
    assert q.config.a_clip == 0.9
    delattr(lin, "_clq_segments")
    q = _best_clips(lin, cfg, ChannelTransform(), method, score)
    assert q.config.w_clip_segments == () and q.config.w_clip == 0.9


def _shared_pair(gen):
    """A block whose ``shared`` Linear [8 → 5 + 7] stands in for two layers ``a``, ``b``."""
    from clq_triton.fuse import _Stash

    block = nn.Module()
    block.shared = nn.Linear(8, 12)
    calls = []
    block.shared.register_forward_hook(lambda m, a, y: calls.append(a[0]))
    stash = _Stash()
    block.a = SharedOutput(block, "shared", 0, 5, stash, users=2)
    block.b = SharedOutput(block, "shared", 5, 12, stash, users=2)
    return block, calls, stash


def test_shared_output_runs_the_layer_once_per_input(gen):
    block, calls, stash = _shared_pair(gen)
    x = torch.randn(3, 8, generator=gen)
    want = block.shared(x)
    calls.clear()
    ya, yb = block.a(x), block.b(x)
    assert torch.equal(ya, want[:, :5]) and torch.equal(yb, want[:, 5:]) and len(calls) == 1
    assert stash.y is None and stash.x is None  # the last user dropped the kept output
    yb = block.b(x)  # alone, or in the other order: still the layer's output on this input
    assert torch.equal(yb, want[:, 5:]) and len(calls) == 2
    assert torch.equal(block.a(x), want[:, :5]) and len(calls) == 2
    x2 = x.clone()  # an equal but other tensor runs the layer again
    block.b(x)
    assert torch.equal(block.a(x2), want[:, :5]) and len(calls) == 4
    stash.x = stash.y = stash.layer = None
    block.a(x)
    with torch.no_grad():
        new = nn.Linear(8, 12)
    block.shared = new  # a layer swapped in (a quantized one) is used, not a kept output
    assert torch.equal(block.b(x), new(x)[:, 5:])
    assert block.a.out_features == 5 and block.b.out_features == 7


def test_shared_output_under_torch_compile(gen):
    """fullgraph inductor traces the pair as one call of the shared layer, gives eager's
    output and leaves nothing kept after the forward."""
    block, calls, stash = _shared_pair(gen)
    def forward(x):
        h = torch.tanh(x)
        return block.a(h).sum(-1) + block.b(h)[..., 0]

    x = torch.randn(4, 8, generator=gen)
    want = forward(x)
    torch._dynamo.reset()
    got = torch.compile(forward, fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert stash.x is None and stash.y is None
    torch._dynamo.reset()


def test_flux_shared_input_checkpoints_and_fusion_versions(gen, tmp_path):
    """FLUX fused with shared inputs saves as fusion version 2 and loads bit for bit (built
    from config.json or into the FP model); a version-1 checkpoint (diffusers' fusion only,
    proj_mlp apart) still loads as it was saved; an unknown version is refused."""
    import json

    fp, inputs = MODELS["flux"](gen)
    fp.eval()
    for shared, version in ((True, 2), (False, 1)):
        model = copy.deepcopy(fp)
        fuse_projections(model, shared_inputs=shared)
        clq_triton.patch(model, "w4a4", progress=False)
        with torch.no_grad():
            want = output(model, inputs)
        d = tmp_path / str(version)
        clq_triton.save_quantized(model, str(d))
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["quantization_config"]["fused_projections"] == version
        for target in (None, copy.deepcopy(fp)):
            loaded = clq_triton.load_quantized(str(d), target)
            assert hasattr(loaded.single_transformer_blocks[0], "to_qkv_mlp") == shared
            with torch.no_grad():
                assert torch.equal(output(loaded, inputs), want)
    cfg["quantization_config"]["fused_projections"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    target = copy.deepcopy(fp)
    with pytest.raises(ValueError, match="fusion versions up to 2"):
        clq_triton.load_quantized(str(d), target)
    assert not clq_triton.fuse.is_fused(target)


@pytest.mark.parametrize("method", ["rtn", "clq"])
def test_attention_that_calls_unfused_layers_is_left_unfused(gen, method):
    """LTX-Video's processor calls to_q / to_k / to_v itself: fuse_projections=True leaves its
    attention unfused (with a warning), and the patched model runs and stays close to FP."""
    from diffusers_models import ltx

    fp, inputs = ltx(gen)
    fp.eval()
    model = copy.deepcopy(fp)
    data = clq_triton.CalibrationData.from_inputs([inputs]) if method == "clq" else None
    with pytest.warns(UserWarning, match="LTXVideoAttnProcessor.*left unfused"):
        report = clq_triton.patch(model, "w8a8", method, data, progress=False,
                                  fuse_projections=True)
    assert report.fused == [] and "transformer_blocks.0.attn1.to_q" in report.quantized
    assert not hasattr(model.transformer_blocks[0].attn1, "to_qkv")
    with torch.no_grad():
        want, got = output(fp, inputs), output(model, inputs)
    assert float((got - want).norm() / want.norm()) < 0.05


def test_a_failed_patch_undoes_the_fusion(gen, monkeypatch):
    """patch(fuse_projections=True) is all or nothing: when calibration fails the model has
    its unfused layers, processors and output back, on their devices."""
    patch_module = importlib.import_module("clq_triton.patch")
    fp, inputs = MODELS["flux"](gen)
    fp.eval()
    model = copy.deepcopy(fp)

    def fail(*args, **kwargs):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(patch_module, "calibrate", fail)
    with pytest.raises(RuntimeError, match="calibration failed"):
        clq_triton.patch(model, "w4a4", CLQ(), clq_triton.CalibrationData.from_inputs([inputs]),
                         progress=False, fuse_projections=True)
    assert not clq_triton.fuse.is_fused(model)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in fp.named_modules()]
    assert type(model.transformer_blocks[0].attn.processor) is \
        type(fp.transformer_blocks[0].attn.processor)
    assert "unfuse_qkv_projections" not in vars(model)
    with torch.no_grad():
        assert torch.equal(output(model, inputs), output(fp, inputs))


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_unfusing_a_clq_fused_model_refuses_clearly(gen, name):
    """diffusers' unfuse_qkv_projections() after clq_triton's fusion (which drops the unfused
    layers) raises a clear error, fused FP or patched, and the model still runs."""
    fp, inputs = MODELS[name](gen)
    fp.eval()
    with torch.no_grad():
        want = output(fp, inputs)
    fused = copy.deepcopy(fp)
    fuse_projections(fused)
    patched = copy.deepcopy(fp)
    clq_triton.patch(patched, "w8a8", progress=False, fuse_projections=True)
    for model in (fused, patched):
        with pytest.raises(RuntimeError, match="cannot be unfused"):
            model.unfuse_qkv_projections()
        with torch.no_grad():
            torch.testing.assert_close(output(model, inputs), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_a_diffusers_fused_model_patches_what_runs_and_loads(gen, name, tmp_path):
    """A model fused with diffusers' own fuse_qkv_projections() (unfused layers kept, unused)
    and then patched quantizes only the fused layers; its checkpoint loads, built from
    config.json or into the (unfused) FP model, and computes the same output."""
    fp, inputs = MODELS[name](gen)
    fp.eval()
    model = copy.deepcopy(fp)
    model.fuse_qkv_projections()
    report = clq_triton.patch(model, "w8a8", CLQ(clps=False),
                              clq_triton.CalibrationData.from_inputs([inputs]), progress=False)
    assert not [n for n in report.quantized if n.endswith((".to_q", ".to_k", ".to_v"))
                and n.replace(n.rpartition(".")[2], "to_qkv") in report.quantized]
    assert any(n.endswith("to_qkv") for n in report.quantized) and report.fused
    with torch.no_grad():
        want = output(model, inputs)
    clq_triton.save_quantized(model, str(tmp_path))
    for target in (None, copy.deepcopy(fp)):
        loaded = clq_triton.load_quantized(str(tmp_path), target)
        with torch.no_grad():  # CLQ's FLUX reloads to ~1e-5, fused or not (not bit for bit)
            torch.testing.assert_close(output(loaded, inputs), want, rtol=1e-4, atol=1e-4)


def test_wan_i2v_image_kv_is_one_fused_layer(gen, tmp_path):
    """Wan I2V: the image cross-attention's k/v become to_added_kv with its segments, listed
    in report.fused; the never-called add_k_proj / add_v_proj are neither kept as weights
    nor quantized; the fusion preserves the function and the CLQ checkpoint loads."""
    from diffusers_models import wan_i2v

    fp, inputs = wan_i2v(gen)
    fp.eval()
    with torch.no_grad():
        want = output(fp, inputs)
    fused = copy.deepcopy(fp)
    names = fuse_projections(fused)
    assert "blocks.0.attn2.to_added_kv" in names
    assert segments(fused.get_submodule("blocks.0.attn2.to_added_kv")) == (64, 64)
    assert not any(type(m) is nn.Linear and n.endswith(("add_k_proj", "add_v_proj"))
                   for n, m in fused.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(output(fused, inputs), want, rtol=0, atol=1e-6)
    model = copy.deepcopy(fp)
    report = clq_triton.patch(model, "w8a8", CLQ(clps=False),
                              clq_triton.CalibrationData.from_inputs([inputs]), progress=False,
                              fuse_projections=True)
    assert "blocks.1.attn2.to_added_kv" in report.fused
    assert not [n for n in report.quantized if n.endswith(("add_k_proj", "add_v_proj"))]
    with torch.no_grad():
        got = output(model, inputs)
    assert float((got - want).norm() / want.norm()) < 0.05
    clq_triton.save_quantized(model, str(tmp_path))
    loaded = clq_triton.load_quantized(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, inputs), got, rtol=1e-4, atol=1e-4)


def test_nothing_shared_outlives_a_block_whose_attention_is_skipped(gen):
    """FLUX single blocks with attention skipped (a cache such as pyramid attention broadcast
    returns a kept output): proj_mlp runs the shared layer, and the block's forward leaves
    no input or output of it kept; the output is the unfused model's with the same skip.
    Also after deepcopy, and in a patched model."""
    fp, inputs = MODELS["flux"](gen)
    fp.eval()

    def skip_attention(model):
        for block in model.single_transformer_blocks:
            block.attn.forward = lambda hidden_states, **kw: hidden_states * 0.5

    fused = copy.deepcopy(fp)
    fuse_projections(fused)
    patched = copy.deepcopy(fp)
    clq_triton.patch(patched, "w8a8", progress=False, fuse_projections=True)
    for model in (fused, copy.deepcopy(fused), patched):
        skip_attention(model)
        with torch.no_grad():
            output(model, inputs)
        stashes = [b.proj_mlp._stash for b in model.single_transformer_blocks]
        assert all(s.x is None and s.y is None and s.layer is None for s in stashes)
    skip_attention(fp)
    with torch.no_grad():
        torch.testing.assert_close(output(fused, inputs), output(fp, inputs), rtol=0, atol=1e-6)
