"""Runtime modules for quantized weights: a Linear whose weight stays packed.

:class:`QuantLinear` holds a layer in the GPTQ int layout (the tensors of the checkpoint, unchanged) and
computes through ``compress_kernels.dispatch``, which picks the fastest implementation available for
the device and falls back to the pure-torch reference (unpack, dequantize, matmul).
"""

from __future__ import annotations

import torch
from torch import nn

from compress_kernels import dispatch
from compress_kernels.reference import gptq_dequantize, packed_length

from .primitives import QuantResult


class QuantModule(nn.Module):
    """Base of runtime modules whose weight is stored quantized (GPTQ int, NF4, ...).

    Subclasses set ``in_features``, ``out_features`` and ``bias``; the harness uses this type to find
    quantized layers and count their logical parameters.
    """

    in_features: int
    out_features: int

    def __init__(self):
        super().__init__()
        # where kernels keep their load-time form of the weight (compress_kernels.dispatch); not state
        self._kernel_cache: dict = {}

    def _apply(self, fn, recurse=True):
        self._kernel_cache.clear()  # a moved or cast weight is converted again on first use
        return super()._apply(fn, recurse)

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features


class QuantLinear(QuantModule):
    """``y = x W^T + b`` with W stored as GPTQ-layout integer codes, scales and zero points.

    Args:
        in_features, out_features: the dense layer's shape (K, N).
        bits: code width (2, 3, 4, 8).
        group_size: columns per group (-1: one group); with act-order g_idx can be any assignment.
        bias: whether the layer has a bias.
        zero_offset: 1 for checkpoint format v1 ("gptq", stores zero - 1), 0 for v2.
        device: where the (empty) buffers are created; "meta" for a skeleton filled by load_state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 zero_offset: int = 1, device: str | torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, packed_length(out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **kw))
        else:
            self.bias = None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int, zero_offset: int = 1) -> "QuantLinear":
        """Build from checkpoint tensors (qweight, qzeros, scales, g_idx and optional bias)."""
        k, n = tensors["g_idx"].shape[0], tensors["scales"].shape[1]
        layer = cls(k, n, bits, group_size, bias="bias" in tensors, zero_offset=zero_offset, device="meta")
        layer.load_state_dict(tensors, assign=True)
        return layer

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from a QuantResult (as written to a v1 checkpoint)."""
        from .formats import gptq_tensors

        return cls.from_tensors(gptq_tensors(result, bias), result.spec.bits, result.spec.group_size, zero_offset=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K]."""
        return gptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                    self.bias, self.zero_offset, cache=self._kernel_cache)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
