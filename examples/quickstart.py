"""Quickstart: calibrate a DiT with CLQ, quantize it to W4A4, compare FP and W4A4 samples.

    python examples/quickstart.py                   # shipped tiny DiT, CPU, a few minutes
    python examples/quickstart.py --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \\
        --prompt "a red fox in snow" --steps 20 --save pixart-w4a4          # real model, GPU

The same as the installed command ``clq-triton quickstart`` (clq_triton/cli.py): writes one
PNG (``--out``), FP samples on the left and quantized samples from the same noise on the
right, each captioned; prints the metrics (tiny DiT: the shape/colour/position checker,
paired PSNR vs FP, Fréchet feature distance to real images; a real model: paired PSNR), what
was quantized and skipped, the weight memory before and after, and the time of each phase.
"""

import sys

from clq_triton.cli import main

if __name__ == "__main__":
    main(["quickstart", *sys.argv[1:]])
