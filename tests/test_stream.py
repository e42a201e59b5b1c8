"""The block stream (O(L) CBC): block i+1's calls built from block i's, checked against
replaying the model, and calibration through it identical to calibration by replay."""

import copy

import pytest
import torch
from torch import nn

import clq_triton
import clq_triton.calibrate as calibrate_mod
from clq_triton import CLQ, CalibrationData, SmoothQuant
from clq_triton.blocks import block_inputs, find_blocks
from clq_triton.stream import BlockStream, block_links
from diffusers_models import MODELS


@pytest.fixture(autouse=True)
def torch_backend():
    with clq_triton.backend("torch"):
        yield


def _data(name, gen):
    model, a = MODELS[name](gen)
    _, b = MODELS[name](gen)
    return model.eval(), CalibrationData.from_inputs([a, b])


def _same_calls(got, want):
    g, _ = torch.utils._pytree.tree_flatten(got)
    w, _ = torch.utils._pytree.tree_flatten(want)
    assert len(g) == len(w)
    for x, y in zip(g, w):
        if torch.is_tensor(y):
            assert torch.equal(x, y)
        else:
            assert x == y


class Skip(nn.Module):
    """Three blocks; between blocks 0 and 1 the model adds the input (a U-ViT-like skip),
    so block 1's call does not follow from block 0's alone."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(),
                                                  nn.Linear(128, 64)) for _ in range(3))

    def forward(self, x):
        h = self.blocks[0](x)
        h = self.blocks[1](h + x)
        return self.blocks[2](h)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stream_matches_replay_on_every_architecture(name, gen):
    """Every linked next call equals the one a model replay records, block after block, with
    the blocks already quantized (the CBC stream)."""
    model, data = _data(name, gen)
    named = find_blocks(model, data.samples[0], "cpu")
    names = [n for n, _ in named]
    links = block_links(model, [b for _, b in named], data.samples[0], "cpu")
    assert all(link is not None for link in links), name  # diffusers DiTs chain their blocks
    clq_triton.patch(model, "w4a4", "hadamard", progress=False)  # quantize every block
    stream = BlockStream(model, names, links, data, "cpu")
    for i in range(1, len(names)):
        stream.advance()
        _same_calls(stream.calls, block_inputs(model, model.get_submodule(names[i]), data, "cpu"))
    assert stream.replays == 0


def test_missing_link_falls_back_to_replay(gen):
    model = Skip().eval()
    data = CalibrationData.from_inputs([{"x": torch.randn(3, 5, 64, generator=gen)}
                                        for _ in range(2)])
    names = ["blocks.0", "blocks.1", "blocks.2"]
    links = block_links(model, list(model.blocks), data.samples[0], "cpu")
    assert links[0] is None and links[1] is not None
    stream = BlockStream(model, names, links, data, "cpu")
    for i in (1, 2):
        stream.advance()
        _same_calls(stream.calls, block_inputs(model, model.blocks[i], data, "cpu"))
    assert stream.replays == 1


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("name,method", [
    ("dit", CLQ(w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.8))),
    ("dit", CLQ(cbc=False, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.8))),
    ("flux", CLQ(w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.8))),
    ("sd3", SmoothQuant()),
])
def test_streamed_calibration_equals_replayed(name, method, gen, monkeypatch):
    """O(L) streaming and O(L²) replay (every link removed) quantize bit-identically; the
    stream runs the whole model a fixed number of times, whatever the depth. (Not the
    "depth" target: its curve ends where links do, see the next test.)"""
    model, data = _data(name, gen)
    replayed = copy.deepcopy(model)
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    clq_triton.patch(model, "w4a4", method, data, progress=False)
    real_links = calibrate_mod.block_links
    monkeypatch.setattr(calibrate_mod, "block_links",
                        lambda *a: [None] * len(real_links(*a)))
    clq_triton.patch(replayed, "w4a4", method, data, progress=False)
    want = _state(replayed)
    got = _state(model)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # find_blocks, block_links, and one capture of block 0's inputs per stream and sample
    assert len(forwards) <= 2 + 2 * len(data)


def test_clps_depth_target_records_depths(gen):
    """"depth" picks, per layer, a block at most clps_depth after its own; the chosen depths
    are in the report."""
    model, data = _data("dit", gen)
    report = clq_triton.patch(model, "w4a4", CLQ(clps_target="depth", clps_depth=1,
                                                 w_clip_grid=(1.0,), a_clip_grid=(1.0,)),
                              data, progress=False)
    assert set(report.clps_depths) == set(report.quantized)
    last = [n for n in report.quantized if n.startswith("transformer_blocks.1.")]
    assert all(report.clps_depths[n] == 0 for n in last)  # no block after the last
    assert all(d in (0, 1) for d in report.clps_depths.values())


def test_clps_depth_curve_ends_where_blocks_do_not_link(gen, monkeypatch):
    """A block whose input does not follow from the previous block's output (a U-ViT skip;
    here every link removed) ends the error-vs-depth curve: every depth is 0, and the layers
    are those of the block target."""
    model, data = _data("dit", gen)
    block = copy.deepcopy(model)
    real_links = calibrate_mod.block_links
    monkeypatch.setattr(calibrate_mod, "block_links", lambda *a: [None] * len(real_links(*a)))
    grid = dict(w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0,))
    report = clq_triton.patch(model, "w4a4", CLQ(clps_target="depth", clps_depth=2, **grid),
                              data, progress=False)
    clq_triton.patch(block, "w4a4", CLQ(**grid), data, progress=False)
    assert set(report.clps_depths.values()) == {0}
    want, got = _state(block), _state(model)
    assert all(torch.equal(got[k], want[k]) for k in want)
