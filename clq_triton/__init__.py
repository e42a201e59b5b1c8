"""clq-triton: CLQ quantization of diffusion transformers, run through Triton kernels.

    import clq_triton
    data = clq_triton.capture_calibration(pipe.transformer, lambda: pipe(prompts))
    report = clq_triton.patch(pipe.transformer, "w4a4", clq_triton.CLQ(), calibration=data)
"""

from .capture import CalibrationData, capture_calibration
from .config import QuantConfig
from .kernels._runtime import backend, get_backend, set_backend
from .kernels.tuning import set_autotune
from .methods import CLQ, METHODS, RTN, Hadamard, Method, QuaRot, SmoothQuant, SVDQuant
from .patch import PatchReport, eligible_linears, patch
from .quant_linear import QuantLinear, cache_dequantized_weights, use_int8_operands
from .serialization import load_quantized, save_quantized

__version__ = "0.2.0"
__all__ = ["CLQ", "CalibrationData", "Hadamard", "METHODS", "Method", "PatchReport",
           "QuantConfig", "QuantLinear", "QuaRot", "RTN", "SmoothQuant", "backend",
           "cache_dequantized_weights",
           "capture_calibration", "eligible_linears", "get_backend", "load_quantized", "patch",
           "save_quantized", "SVDQuant", "set_autotune", "set_backend", "use_int8_operands"]
