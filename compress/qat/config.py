"""QATConfig: what quantization-aware training simulates, validated so the result can always be packed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import JSONConfig, _check_regexes
from ..errors import CompressError
from ..quant.nf4 import check_blocksize
from ..quant.primitives import QuantSpec

METHODS = ("int", "nf4")


@dataclass
class QATConfig(JSONConfig):
    """Fake quantization during training, and the packed format ``convert`` writes afterwards.

    Args:
        method: 'int' (per-group integers, converted to the GPTQ layout) or 'nf4' (blockwise
            normal-float 4-bit, converted to the bitsandbytes layout).
        bits: 2, 3, 4 or 8 for 'int' (NF4 is always 4).
        group_size: input columns sharing a scale for 'int': 32, 64, 128 or -1 (one per row).
        sym: symmetric (zero point fixed at the middle code) or asymmetric 'int'.
        learnable_scales: 'int' scales become parameters trained with LSQ's scaled gradient
            (zero points stay fixed); otherwise scales follow the weights at every step.
        blocksize, double_quant: NF4 block size and double quantization of the block maxima.
        act_bits: None, or 8 for per-token int8 fake-quant of every quantized layer's input (W4A8
            training). Packed formats store weights only, so ``convert`` leaves activations in floating point.
        quantize_head: also fake-quantize an untied output head (embeddings always stay in floating point).
        skip: regular expressions (re.search on the module's dotted name) of layers to keep in floating point.
        warmup_steps: for QATCallback: optimizer steps in floating point before fake quantization starts.
        freeze_at: for QATCallback: fraction of the training steps after which ranges stop moving
            (1.0: never).
    """

    method: str = "int"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    learnable_scales: bool = False
    blocksize: int = 64
    double_quant: bool = True
    act_bits: int | None = None
    quantize_head: bool = False
    skip: list[str] = field(default_factory=list)
    warmup_steps: int = 0
    freeze_at: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise CompressError(f"--method {self.method} is not a QAT method; choose int or nf4")
        if self.method == "int":
            QuantSpec(self.bits, self.group_size, self.sym)  # validates bits and group size
        else:
            if self.bits != 4:
                raise CompressError(f"NF4 is a 4-bit format; --bits {self.bits} cannot be packed as NF4 (use --method int)")
            if self.learnable_scales:
                raise CompressError("learnable scales apply to --method int; NF4's block scales are the block maxima, "
                                    "which the bitsandbytes layout cannot store otherwise")
            check_blocksize(self.blocksize)
        if self.act_bits not in (None, 8):
            raise CompressError(f"activation fake-quant supports 8 bits (W4A8), got {self.act_bits}")
        if self.warmup_steps < 0:
            raise CompressError(f"warm-up steps cannot be negative, got {self.warmup_steps}")
        if not 0 < self.freeze_at <= 1:
            raise CompressError(f"freeze_at must be in (0, 1], got {self.freeze_at}")
        _check_regexes(self.skip, "--skip")

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def skips(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.skip)

    @property
    def label(self) -> str:
        if self.method == "nf4":
            return f"qat-nf4-b{self.blocksize}{'-dq' if self.double_quant else ''}"
        g = "c" if self.group_size == -1 else str(self.group_size)
        return f"qat-w{self.bits}g{g}{'' if self.sym else '-asym'}{'-a8' if self.act_bits else ''}"
