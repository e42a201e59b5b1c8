"""Triton kernels, their PyTorch references and the formats they share. Importing the
package registers the operators torch.ops.clq_triton.rotate_quantize and .quant_matmul."""

from . import gemm, rotate_quantize  # noqa: F401  (registers the operators)
