"""A patched transformer under accelerate's offload hooks (what diffusers'
enable_sequential_cpu_offload / enable_model_cpu_offload install)."""

import copy

import pytest
import torch

import clq_triton
from clq_triton import QuantConfig, QuantLinear
from diffusers_models import MODELS, output
from toy_models import dit_pipeline, sample


def test_state_dict_holds_tensors_only(gen):
    """accelerate moves every state-dict value: the layer's settings travel as a tensor."""
    q = QuantLinear.from_linear(torch.nn.Linear(128, 16), QuantConfig(),
                                perm=torch.randperm(128, generator=gen))
    assert all(torch.is_tensor(v) for v in q.state_dict().values())
    fresh = QuantLinear(128, 16, config=QuantConfig(hadamard_block=128), has_perm=True)
    fresh.load_state_dict(q.state_dict())
    assert fresh.config == q.config
    x = torch.randn(3, 128, generator=gen)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("offload_buffers", [True, False])
@pytest.mark.parametrize("int8", [False, True], ids=["packed", "int8-operands"])
@pytest.mark.parametrize("name, fuse", [("pixart", False), ("flux", True)])
def test_sequential_offload_hooks_give_the_same_output(gen, offload_buffers, int8, name, fuse):
    """accelerate.cpu_offload (enable_sequential_cpu_offload's hook) on a patched PixArt, and
    a fused FLUX (its shared-input layers included): quantized buffers wait on the meta
    device (offload_buffers) and arrive per layer; the output is the un-offloaded model's,
    bit for bit."""
    from accelerate import cpu_offload

    model, inputs = MODELS[name](gen)
    clq_triton.patch(model.eval(), QuantConfig(group_size=None), progress=False,
                     fuse_projections=fuse)
    if int8:
        clq_triton.use_int8_operands(model)
    with torch.no_grad():
        want = output(model, inputs)
    hooked = copy.deepcopy(model)
    cpu_offload(hooked, execution_device=torch.device("cpu"), offload_buffers=offload_buffers)
    if offload_buffers:
        assert any(b.device.type == "meta" for b in hooked.buffers())
    with torch.no_grad():
        assert torch.equal(output(hooked, inputs), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("how", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_pipeline_offload_of_a_patched_transformer(how):
    pipe = dit_pipeline(seed=5, layers=2)
    clq_triton.patch(pipe.transformer, "w4a4", progress=False)
    want = sample(pipe.to("cuda"), [1, 2], steps=2)
    pipe.to("cpu")
    getattr(pipe, how)()
    got = sample(pipe, [1, 2], steps=2)
    assert abs(got - want).max() < 1e-2
