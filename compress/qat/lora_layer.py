"""The LoRA layer peft puts around one of our quantized layers (QuantLinear, NF4Linear).

peft knows nn.Linear and a few libraries' quantized layers, not ours; its custom-module hook
(``LoraConfig._register_custom_module``) maps our :class:`~compress.quant.linear.QuantModule` to
:class:`QuantLoraLayer`, which computes ``base(x) + B(A(dropout(x))) * scaling`` with the base frozen.

The base output goes through :class:`FrozenQuantMatmul`: the forward pass runs the layer as it is (any
kernel of compress_kernels.dispatch, packed weight), and the backward pass returns only the gradient
with respect to the input, ``grad_y @ W``, dequantizing W for that one product. No gradient reaches the
packed codes, scales or bias, and the fast kernels need no autograd support of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn


class FrozenQuantMatmul(torch.autograd.Function):
    """``y = layer(x)`` with a gradient for x alone (the layer's stored weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight = ctx.layer.dequantize(torch.float32).to(grad_y.device)  # [N, K]
        grad_x = (grad_y.float() @ weight).to(grad_y.dtype)
        return grad_x, None


class QuantLoraLayer(nn.Module, LoraLayer):
    """LoRA around a frozen QuantModule: ``y = base(x) + B(A(dropout(x))) * scaling`` per active adapter.

    Args:
        base_layer: the quantized layer (QuantLinear or NF4Linear), input [..., K], output [..., N].
        adapter_name: peft's adapter name.
        config: the peft LoraConfig (dropout, initialisation).
        r, lora_alpha: rank and alpha (scaling = alpha / r); A is [r, K], B is [N, r], B starts at zero.

    Merging in place is not possible (the base is packed); compress.qat.lora_merge dequantizes the base,
    adds :meth:`get_delta_weight` and quantizes the sum again.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("DoRA is not supported on compress quantized layers")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's weight update ``B @ A * scaling`` [N, K] in float32."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("adapters on a packed quantized layer cannot be merged in place; use compress.qat.merge_adapters")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        result = FrozenQuantMatmul.apply(x, base) if torch.is_grad_enabled() else base(x)
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
