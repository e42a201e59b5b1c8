"""The kernels as PyTorch operators: schemas and fake implementations (opcheck),
torch.compile(fullgraph=True) of patched diffusers transformers, CUDA graphs."""


import pytest
import torch
from torch import nn

import clq_triton
from clq_triton import QuantConfig, QuantLinear
from clq_triton.kernels.formats import pack_codes
from clq_triton.kernels.quantize import quantize_ref, quantize_weight_ref
from diffusers_models import MODELS, output


@pytest.mark.parametrize("block, group, bits", [(64, 64, 4), (None, None, 8), (128, 128, 4)])
def test_rotate_quantize_operator(block, group, bits, gen):
    x = torch.randn(9, 256, generator=gen)
    perm = torch.randperm(256, generator=gen).int()
    cs = torch.rand(256, generator=gen) + 0.5
    shift = torch.randn(256, generator=gen)
    torch.library.opcheck(torch.ops.clq_triton.rotate_quantize.default,
                          (x, perm, shift, cs, block, group, bits, 0.9))
    torch.library.opcheck(torch.ops.clq_triton.rotate_quantize.default,
                          (x.bfloat16(), None, None, None, block, group, bits, 1.0))
    torch.library.opcheck(torch.ops.clq_triton.rotate_quantize.default,  # int8 operands
                          (x, perm, None, cs, block, group, bits, 1.0, False))


@pytest.mark.parametrize("w_bits, a_bits, group", [(4, 4, 64), (4, 8, None), (8, 8, 128)])
def test_quant_matmul_operator(w_bits, a_bits, group, gen):
    xc, xs = quantize_ref(torch.randn(7, 256, generator=gen), group, a_bits)
    wc, ws, wz = quantize_weight_ref(torch.randn(24, 256, generator=gen), group, w_bits)
    args = (pack_codes(xc, a_bits), xs, pack_codes(wc, w_bits), ws, wz,
            torch.randn(24, generator=gen), a_bits, w_bits, group, torch.bfloat16)
    torch.library.opcheck(torch.ops.clq_triton.quant_matmul.default, args)


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_compile_fullgraph_patched_transformer(name, gen):
    """No graph breaks: the quantized layers trace as two opaque operators each."""
    model, inputs = MODELS[name](gen)
    model = model.eval()
    clq_triton.patch(model, QuantConfig(group_size=None), progress=False)
    with torch.no_grad():
        eager = output(model, inputs)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = output(compiled, inputs)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_compile_counts_operators_in_the_graph(gen):
    layer = QuantLinear.from_linear(nn.Linear(128, 32), QuantConfig(hadamard_block=64),
                                    perm=torch.randperm(128, generator=gen))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(3, 5, 128, generator=gen)
    y = torch.compile(layer, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(y, layer(x))
    layer.use_int8_operands()  # the same two operators on the int8 copy
    torch._dynamo.reset()
    y8 = torch.compile(layer, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(y8, y)
    for graph in graphs:
        targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
        assert sum("clq_triton.rotate_quantize" in t for t in targets) == 1
        assert sum("clq_triton.quant_matmul" in t for t in targets) == 1
    assert len(graphs) == 2


def test_empty_batch_like_nn_linear(gen):
    lin = nn.Linear(128, 16)
    q = QuantLinear.from_linear(lin, QuantConfig())
    for shape in ((0, 128), (2, 0, 128)):
        x = torch.randn(*shape)
        assert q(x).shape == lin(x).shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_captures_a_patched_forward(gen):
    model, inputs = MODELS["pixart"](gen)
    model = model.eval().cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    clq_triton.patch(model, QuantConfig(group_size=None), progress=False)
    with torch.no_grad():
        want = output(model, inputs)  # warm-up: compiles the kernels, builds Hadamard tiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = output(model, inputs)
        graph.replay()
    torch.testing.assert_close(got, want)
