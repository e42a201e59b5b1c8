"""GPU probe of the rotate+quantize kernel's launch settings: for each Hadamard block, tile
rows (BM), warps and dot precision, the share of packed bytes equal to the PyTorch reference's.

    python bench/rotate_probe.py        # on a CUDA machine; one JSON line per setting

Written after block 128 gave wrong codes (right scales) on an H100 with triton 3.6 while the
interpreter and every CPU test agreed with the reference.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clq_triton.kernels import rotate_quantize as rq  # noqa: E402
from clq_triton.kernels._runtime import backend  # noqa: E402

ORIG_PLAN = rq.plan
OVERRIDE: dict = {}


def plan(*args, **kwargs):
    p = ORIG_PLAN(*args, **kwargs)
    p = dict(p, constexprs=dict(p["constexprs"]))
    for key, value in OVERRIDE.items():
        if key == "num_warps":
            p["num_warps"] = value
        else:
            p["constexprs"][key] = value
    return p


def settings(xdt, block):
    """(BM, warps, precision) to try: the shipped plan, and for block 128 a grid."""
    if block != 128:
        return [(None, None, None)]
    precs = ("tf32", "ieee") if xdt != torch.float32 else ("tf32x3", "ieee")
    return [(None, None, None)] + [(bm, w, p) for bm in (16, 32, 64) for w in (4, 8)
                                   for p in precs]


def main(dtype_name="bf16"):
    rq.plan = plan
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    xdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(0)
    m, k = (333, 1152) if dev == "cuda" else (37, 256)
    x = torch.randn(m, k, generator=g) * 2
    x[:, 5] *= 40
    x = x.to(xdt).to(dev)
    perm = torch.randperm(k, generator=g).to(dev)
    # timing shape: PixArt's FFN input (4096 tokens × 4608)
    xt = torch.randn(4096, 4608, device=dev, dtype=xdt) if dev == "cuda" else None
    pt = torch.randperm(4608, device=dev) if dev == "cuda" else None
    if dev == "cuda":
        from triton.testing import do_bench

        y = torch.empty_like(xt)
        print(json.dumps(dict(dtype=dtype_name, copy_ms=do_bench(lambda: y.copy_(xt)),
                              gather_ms=do_bench(lambda: torch.index_select(xt, 1, pt)))),
              flush=True)
    for block in (None, 64, 128):
        for group, bits in ((None, 4), (64, 4)):
            for use_perm in (True, False):
                p = perm if use_perm else None
                with backend("torch"):
                    qr, sr = rq.rotate_quantize(x, p, block, group, bits)
                for bm, warps, prec in settings(xdt, block):
                    if bm and not use_perm:  # the grid with the permutation only
                        continue
                    OVERRIDE.clear()
                    OVERRIDE.update({key: v for key, v in
                                     (("BM", bm), ("num_warps", warps), ("PREC", prec)) if v})
                    row = dict(dtype=dtype_name, block=block, group=group, bits=bits,
                               perm=use_perm, BM=bm, warps=warps, prec=prec)
                    try:
                        q, s = rq.rotate_quantize(x, p, block, group, bits)
                        row["bytes_equal"] = round((q == qr).float().mean().item(), 5)
                        row["scale_rel"] = float(((s - sr).abs() / sr.abs()).nan_to_num().max())
                        if dev == "cuda":
                            ptt = pt if use_perm else None
                            row["ms_4096x4608"] = do_bench(
                                lambda: rq.rotate_quantize(xt, ptt, block, group, bits,
                                                           check_perm_values=False))
                    except Exception as e:  # noqa: BLE001 - a setting that fails is a result
                        row["error"] = repr(e)[:200]
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
