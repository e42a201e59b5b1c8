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


def test_a_built_layer_allocates_nothing_that_outlives_a_call(gen):
    """Under CUDA-graph capture every tensor a call allocates comes from the graph's pool; one
    kept past the call (the ±1 Hadamard tile, built lazily on the first call before) is reused
    and overwritten by later replays. So a QuantLinear makes what it keeps when it is built or
    moved. Without a GPU: every tensor made during its first call (any ATen op, through the
    launchers' eager path) is freed once the output is, in each rotation mode. The launcher's
    caches are cleared before the layer is built, so a lazily built tile would be built here."""
    import gc
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    import clq_triton.kernels.gemm as gm
    import clq_triton.kernels.rotate_quantize as rq

    class Made(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.refs.append(weakref.ref(t))
            return out

    def call(q, x):  # QuantLinear.forward's two steps, eagerly (out=: not the custom ops)
        c, k = q.config, x.shape[1]
        xq = torch.empty(x.shape[0], k // 2, dtype=torch.uint8)
        xs = torch.empty(x.shape[0], k // (c.group_size or k))
        rq.rotate_quantize(x, q.perm, c.hadamard_block, c.group_size, 4, out=(xq, xs),
                           check_perm_values=False)
        y = torch.empty(x.shape[0], q.out_features)
        gm.quant_matmul(xq, xs, q.qweight, q.wscale, q.wgroup, q.bias, 4, 4, c.group_size,
                        torch.float32, out=y)
        return y

    import clq_triton.kernels.hadamard as hd

    for block, group, k in ((32, 64, 256), (128, 128, 256), (256, None, 256), (64, None, 256),
                            (512, None, 1024)):  # 512: the launcher's outer factor too
        for obj in (*vars(rq).values(), *vars(hd).values()):
            if hasattr(obj, "cache_clear"):
                obj.cache_clear()
        q = QuantLinear.from_linear(nn.Linear(k, 32), QuantConfig(group_size=group,
                                                                  hadamard_block=block))
        x = torch.randn(5, k, generator=gen)
        made = Made()
        with clq_triton.backend("triton"), made:
            y = call(q, x)
        del y
        gc.collect()
        alive = [r() for r in made.refs if r() is not None]
        assert alive == [], f"block {block}: {[tuple(t.shape) for t in alive]} kept"


@pytest.mark.parametrize("name, fuse", [("pixart", False), ("flux", True)])
def test_inductor_compiles_a_patched_transformer_without_recompiles(name, fuse, gen):
    """torch.compile with the inductor backend (C++ on CPU) and fullgraph=True: the output is
    eager's, and new timesteps (sampler steps) reuse the compiled graph; also with fused
    projections, FLUX's shared-input layers (clq_triton.fuse.SharedOutput) included."""
    import torch._dynamo.utils as dynamo_utils

    model, inputs = MODELS[name](gen)
    model = model.eval()
    clq_triton.patch(model, QuantConfig(group_size=None), progress=False,
                     fuse_projections=fuse)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():  # FLUX takes timesteps in [0, 1]
        for t in (0.999, 0.5, 0.021) if name == "flux" else (999, 500, 21):
            step = {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}
            torch.testing.assert_close(output(compiled, step), output(model, step),
                                       rtol=1e-5, atol=1e-5)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_on_a_freshly_loaded_checkpoint(tmp_path, gen):
    """torch.compile(mode="reduce-overhead") straight after load_quantized, with no eager
    warm-up: the first call is the CUDA-graph warm-up (nothing the launchers keep may come from
    its pool), and replays give eager's output across timesteps without recompiling."""
    model, inputs = MODELS["pixart"](gen)
    clq_triton.patch(model.eval(), QuantConfig(group_size=None), progress=False)
    clq_triton.save_quantized(model, str(tmp_path))
    loaded = clq_triton.load_quantized(str(tmp_path), device="cuda")
    eager = clq_triton.load_quantized(str(tmp_path), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(loaded, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for t in (999, 500, 21, 999):
            step = {k: v.cuda() if torch.is_tensor(v) else v
                    for k, v in {**inputs,
                                 "timestep": torch.full_like(inputs["timestep"], t)}.items()}
            got = output(compiled, step).clone()
            torch.testing.assert_close(got, output(eager, step), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
