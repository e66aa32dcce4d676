"""Fake-quant layers: the forward pass computes with exactly the weights the packed checkpoint will hold.

Rounding has no useful gradient, so it is passed straight through (STE): the value is the rounded
one and the gradient is the identity. It is written as ``rounded.detach() + (x - x.detach())``, whose
value is exactly ``rounded`` (``x - x.detach()`` is exactly zero), so the fake-quant forward pass and
the converted model agree to the bit on the weights, not just approximately.

Integer weights follow the GPTQ layout's arithmetic: per-group scales rounded to float16, whole zero
points, ``w = s * (q - z)``, bias stored in float16. NF4 weights come from the same quantizer that
writes the bitsandbytes layout (``compress.quant.nf4.quantize_weight``, double quantization included),
so the block maxima are what the file will hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.nf4 import quantize_weight as nf4_quantize
from ..quant.primitives import _SCALE_MIN, QuantResult, group_index, quantize_groups
from .config import QATConfig


def exact_ste(rounded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Value ``rounded``, gradient of the identity with respect to ``x``."""
    return rounded.detach() + (x - x.detach())


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 (kept in x's dtype), gradient passed straight through."""
    return exact_ste(x.detach().half().to(x.dtype), x)


class ActivationFakeQuant(nn.Module):
    """Per-token symmetric int8 fake quantization of a layer's input (the A8 of W4A8)."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.qmax = (1 << (bits - 1)) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (x.detach().abs().amax(dim=-1, keepdim=True) / self.qmax).clamp(min=1e-8)
        return exact_ste(torch.clamp(torch.round(x.detach() / scale), -self.qmax, self.qmax) * scale, x)


class FakeQuantLinear(nn.Module):
    """An nn.Linear whose forward pass uses fake-quantized weights (and optionally inputs).

    Built with :meth:`from_linear`, which takes over the Linear's own weight and bias parameters.
    ``enabled`` False computes in floating point (warm-up); :meth:`freeze` fixes the integer ranges.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, config: QATConfig):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.method = config.method
        self.spec = config.spec() if config.method == "int" else None
        self.blocksize, self.double_quant = config.blocksize, config.double_quant
        self.act = ActivationFakeQuant(config.act_bits) if config.act_bits else None
        self.enabled = True
        self.frozen = False
        self.learnable = config.learnable_scales
        if self.method == "int":
            self.register_buffer("g_idx", group_index(self.in_features, self.spec.group_size).long(), persistent=False)
            result = self._rtn()
            self.register_buffer("zeros", result.zeros.float())
            if self.learnable:
                self.scale = nn.Parameter(result.scales.clone())
                group = self.in_features if self.spec.group_size == -1 else self.spec.group_size
                # LSQ: scale the step size's gradient by 1 / sqrt(weights per scale * largest code)
                self.grad_scale = 1.0 / math.sqrt(group * self.spec.maxq)
            else:
                self.register_buffer("scales", result.scales.clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig) -> FakeQuantLinear:
        return cls(linear.weight, linear.bias, config)

    # ----------------------------------------------------------------------------------------------
    # the weights the checkpoint will hold

    def _rtn(self) -> QuantResult:
        with torch.no_grad():
            return quantize_groups(self.weight.detach().float(), self.spec)

    def _scales(self) -> torch.Tensor:
        """float32 [N, G] scales in use: learned (float16-rounded, LSQ gradient), frozen, or from the weights."""
        if self.learnable:
            s = self.scale.clamp(min=_SCALE_MIN)
            s = (s - s * self.grad_scale).detach() + s * self.grad_scale
            return fp16_ste(s)
        if self.frozen:
            return self.scales
        result = self._rtn()
        self.scales.copy_(result.scales)
        self.zeros.copy_(result.zeros.float())
        return self.scales

    def _int_weight(self) -> torch.Tensor:
        s = self._scales()
        gi = self.g_idx
        z = self.zeros[:, gi]
        w = self.weight.float()
        if self.learnable:
            u = w / s[:, gi]
            q = torch.clamp(exact_ste(torch.round(u.detach()), u) + z, 0, self.spec.maxq)
            return s[:, gi] * (q - z)
        with torch.no_grad():
            q = torch.clamp(torch.round(w / s[:, gi]) + z, 0, self.spec.maxq)
            w_hat = s[:, gi] * (q - z)
        return exact_ste(w_hat, w)

    def _nf4_weight(self) -> torch.Tensor:
        with torch.no_grad():
            w_hat = nf4_quantize(self.weight.detach(), "nf4", self.blocksize, self.double_quant).dequantize(self.weight.dtype)
        return exact_ste(w_hat, self.weight)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (fake-quantized when enabled)."""
        if not self.enabled:
            return self.weight
        return self._int_weight() if self.method == "int" else self._nf4_weight()

    def _bias(self) -> torch.Tensor | None:
        if self.bias is None or not self.enabled or self.method != "int":
            return self.bias
        return fp16_ste(self.bias)  # the GPTQ layout stores biases in float16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None and self.enabled:
            x = self.act(x)
        w = self.quantized_weight()
        bias = self._bias()
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    # ----------------------------------------------------------------------------------------------
    # training-time controls and conversion

    def freeze(self) -> None:
        """Fix the integer ranges at their current values (learned scales stop training)."""
        if self.method != "int" or self.frozen:
            return
        if self.learnable:
            self.scale.requires_grad_(False)
        else:
            self._scales()  # refresh from the weights one last time
        self.frozen = True

    def int_result(self) -> QuantResult:
        """Codes, scales and zeros exactly as the forward pass uses them."""
        with torch.no_grad():
            s = self._scales().detach().float()
            gi = self.g_idx
            z = self.zeros[:, gi]
            q = torch.clamp(torch.round(self.weight.float() / s[:, gi]) + z, 0, self.spec.maxq)
        return QuantResult(q=q.to(torch.uint8).cpu(), scales=s.cpu(), zeros=self.zeros.to(torch.int32).cpu(),
                           g_idx=self.g_idx.to(torch.int32).cpu(), spec=self.spec)

    def nf4_result(self):
        """The NF4Result the forward pass dequantizes."""
        with torch.no_grad():
            return nf4_quantize(self.weight.detach(), "nf4", self.blocksize, self.double_quant)

    def extra_repr(self) -> str:
        what = f"nf4 block {self.blocksize}" if self.method == "nf4" else \
            f"int{self.spec.bits} group {self.spec.group_size} {'sym' if self.spec.sym else 'asym'}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {what}"
                f"{', learnable scales' if self.learnable else ''}{', int8 inputs' if self.act else ''}, "
                f"enabled={self.enabled}, frozen={self.frozen}")
