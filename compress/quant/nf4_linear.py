"""NF4Linear: a Linear layer whose weight stays in 4-bit blockwise codes (NF4 or FP4, bitsandbytes layout).

The forward pass calls ``compress_kernels.dispatch.nf4_matmul``, which picks the fastest implementation
for the device and falls back to the pure-torch reference: decode the block scales (double
quantization), dequantize straight into the compute dtype, multiply. That is the order of operations of
bitsandbytes' own dequantize-then-matmul path, so the two agree exactly.
"""

from __future__ import annotations

import torch

from compress_kernels import dispatch

from .linear import QuantModule
from .nf4 import NESTED_BLOCKSIZE, NF4Result, NestedState


class NF4Linear(QuantModule):
    """``y = x W^T + b`` with W [N, K] stored as 4-bit codes and blockwise scales.

    Args:
        result: the quantized weight (codes, scales, tables, shape, original dtype).
        bias: optional bias [N]; kept as given (the model's dtype after loading).
        compute_dtype: dtype of the matmul (float32, bfloat16, float16); None computes in the input's
            dtype. The output is returned in the input's dtype either way, as bitsandbytes does.

    Buffers: ``packed`` uint8 [ceil(N*K/2), 1], ``absmax`` (float32, or uint8 codes when double-quantized),
    ``quant_map`` float32 [16], and with double quantization ``nested_absmax``, ``nested_quant_map`` and
    ``offset``. The float32 tables keep their dtype when the module is cast (``.half()``, ``.to(dtype)``):
    they are part of the format, not parameters.
    """

    _EXACT_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")

    def __init__(self, result: NF4Result, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(result.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight shape, got {result.shape}")
        self.out_features, self.in_features = result.shape
        self.quant_type, self.blocksize, self.weight_dtype = result.quant_type, result.blocksize, result.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", result.packed)
        self.register_buffer("absmax", result.absmax)
        self.register_buffer("quant_map", result.quant_map)
        nested = result.nested
        self.double_quant = nested is not None
        self.nested_blocksize = nested.blocksize if nested else NESTED_BLOCKSIZE
        self.register_buffer("nested_absmax", nested.absmax if nested else None)
        self.register_buffer("nested_quant_map", nested.quant_map if nested else None)
        self.register_buffer("offset", nested.offset.reshape(()) if nested else None)
        if bias is not None:
            self.register_buffer("bias", bias)
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize a dense weight [N, K] into a new layer."""
        from .nf4 import quantize_weight

        return cls(quantize_weight(weight, quant_type, blocksize, double_quant), bias, compute_dtype)

    def result(self) -> NF4Result:
        """The stored weight as an NF4Result (shares this module's tensors)."""
        nested = None
        if self.double_quant:
            nested = NestedState(self.nested_absmax, self.nested_quant_map, self.offset, self.nested_blocksize)
        return NF4Result(self.packed, self.absmax, self.quant_map, self.quant_type, self.blocksize,
                         (self.out_features, self.in_features), self.weight_dtype, nested)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K] (default: in the weight's original dtype)."""
        return self.result().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        y = dispatch.nf4_matmul(
            x.to(compute), self.packed, self.absmax, self.quant_map, (self.out_features, self.in_features),
            self.blocksize, self.nested_absmax, self.nested_quant_map, self.offset, self.nested_blocksize, self.bias,
            cache=self._kernel_cache)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        exact = {name: self._buffers[name] for name in self._EXACT_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in exact.items():  # follow the device, keep the dtype and the exact values
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, bias={self.bias is not None}")
