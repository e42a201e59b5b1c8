"""clq-triton: CLQ quantization of diffusion transformers, run through Triton kernels.

    import clq_triton
    report = clq_triton.patch(pipe.transformer, bits="w4a4")
"""

from .config import QuantConfig
from .patch import PatchReport, eligible_linears, patch
from .quant_linear import QuantLinear

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantLinear", "PatchReport", "eligible_linears", "patch"]
