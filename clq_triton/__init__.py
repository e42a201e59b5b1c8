"""clq-triton: CLQ quantization of diffusion transformers, run through Triton kernels.

    import clq_triton
    data = clq_triton.capture_calibration(pipe.transformer, lambda: pipe(prompts))
    report = clq_triton.patch(pipe.transformer, bits="w4a4", method="clq", calibration=data)
"""

from .calibrate import CalibrationOptions
from .capture import CalibrationData, capture_calibration
from .config import QuantConfig
from .kernels._runtime import backend, get_backend, set_backend
from .kernels.tuning import set_autotune
from .patch import METHODS, PatchReport, eligible_linears, patch
from .quant_linear import QuantLinear
from .serialization import load_quantized, save_quantized

__version__ = "0.1.0"
__all__ = ["CalibrationData", "CalibrationOptions", "METHODS", "PatchReport", "QuantConfig",
           "QuantLinear", "backend", "capture_calibration", "eligible_linears", "get_backend",
           "load_quantized", "patch", "save_quantized", "set_autotune", "set_backend"]
