"""The GPTQ checkpoint format (REFERENCES.md section 1): tensors per layer and the quantization_config.

Writing: :func:`gptq_tensors` turns a QuantResult into the tensors transformers, vLLM and GPTQModel
read (qweight, qzeros stored as zero - 1 for checkpoint_format "gptq", float16 scales, g_idx);
:func:`gptq_quantization_config` is the config.json section (also written as quantize_config.json).

Reading: :class:`GPTQFormat` parses that section, including GPTQModel's ``dynamic`` per-module rules,
and answers which bits and group size a layer uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .. import __version__
from ..errors import CompressError
from .packing import pack_dim0, pack_dim1
from .primitives import SUPPORTED_BITS, QuantResult, QuantSpec

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def gptq_tensors(result: QuantResult, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one layer, keyed by suffix (qweight, qzeros, scales, g_idx, bias).

    Shapes for K inputs, N outputs, G groups: qweight int32 [packed(K), N], qzeros int32 [G, packed(N)],
    scales float16 [G, N], g_idx int32 [K], bias float16 [N].
    """
    bits = result.spec.bits
    offset = 1 if checkpoint_format == "gptq" else 0
    stored_zeros = (result.zeros.t().to(torch.int64) - offset) & ((1 << bits) - 1)
    out = {
        "qweight": pack_dim0(result.q.t().to(torch.int64), bits),
        "qzeros": pack_dim1(stored_zeros, bits),
        "scales": result.scales.t().contiguous().to(torch.float16),
        "g_idx": result.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16)
    return {k: v.cpu() for k, v in out.items()}


def _dynamic_key(pattern: str, sign: str) -> str:
    # our patterns use re.search; GPTQModel and vLLM apply dynamic keys with re.match
    body = pattern if pattern.startswith("^") else f".*(?:{pattern})"
    return f"{sign}:{body}"


def gptq_quantization_config(
    spec: QuantSpec,
    *,
    method: str,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    static_groups: bool = False,
    true_sequential: bool = True,
    skip: list[str] | None = None,
    overrides: dict[str, dict] | None = None,
    checkpoint_format: str = "gptq",
    extra_meta: dict | None = None,
) -> dict:
    """The ``quantization_config`` section of config.json (and the body of quantize_config.json)."""
    dynamic = {}
    for pattern in skip or []:
        dynamic[_dynamic_key(pattern, "-")] = {}
    for pattern, values in (overrides or {}).items():
        dynamic[_dynamic_key(pattern, "+")] = dict(values)
    cfg = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": desc_act,
        "sym": spec.sym,
        "damp_percent": damp_percent,
        "static_groups": static_groups,
        "true_sequential": true_sequential,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"compress:{__version__}"], "method": method, **(extra_meta or {})},
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


@dataclass
class GPTQFormat:
    """A parsed GPTQ quantization_config."""

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    dynamic: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_config(cls, quant: dict) -> "GPTQFormat":
        """Parse a quantization_config; one sentence naming the field for anything malformed."""
        if quant.get("quant_method", "gptq") != "gptq":
            raise CompressError(f"quant_method '{quant.get('quant_method')}' is not GPTQ")
        bits, group_size = _bits_and_group(quant, "quantization_config")
        fmt = quant.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CompressError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        for key in ("sym", "desc_act"):
            if quant.get(key) is not None and not isinstance(quant[key], bool):
                raise CompressError(f"quantization_config {key} must be true or false, not {quant[key]!r}")
        dynamic = quant.get("dynamic") or {}
        if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
            raise CompressError("quantization_config dynamic must map module patterns to objects of bits and group_size")
        for key, values in dynamic.items():
            _bits_and_group({"bits": bits, "group_size": group_size, **values}, f"quantization_config dynamic rule {key!r}")
            try:
                re.compile(key[2:] if key[:2] in ("+:", "-:") else key)
            except re.error:
                raise CompressError(f"quantization_config dynamic rule {key!r} is not a valid regular expression") from None
        sym, desc_act = quant.get("sym"), quant.get("desc_act")
        return cls(bits=bits, group_size=group_size, sym=True if sym is None else sym, desc_act=bool(desc_act),
                   checkpoint_format=fmt, dynamic=dynamic)

    @property
    def zero_offset(self) -> int:
        """What readers add to stored zero points: 1 for v1 ("gptq"), 0 for "gptq_v2"."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def layer_spec(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of layer ``name`` after the dynamic rules (the first matching '+' rule wins)."""
        for key, values in self.dynamic.items():
            sign, _, pattern = key.partition(":") if key[:2] in ("+:", "-:") else ("+", "", key)
            if sign == "+" and re.match(pattern, name):
                return int(values.get("bits", self.bits)), int(values.get("group_size", self.group_size))
        return self.bits, self.group_size


def _bits_and_group(section: dict, where: str) -> tuple[int, int]:
    """(bits, group_size) of a GPTQ section, checked: bits in SUPPORTED_BITS, group size -1 or positive."""
    bits, group_size = section.get("bits", 4), section.get("group_size", 128)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise CompressError(f"{where} sets {bits!r}-bit GPTQ, which compress cannot read (2, 3, 4, 8)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise CompressError(f"{where} group_size must be -1 or a positive integer, not {group_size!r}")
    return bits, group_size


def vllm_refusals(name: str, in_features: int, out_features: int, spec: QuantSpec) -> list[str]:
    """Why vLLM's GPTQ kernels would refuse this layer (empty when they accept it).

    vLLM's gptq.py needs in_features divisible by the group size, and both dimensions divisible by the
    numerator of the pack factor 32/bits (8 for 4-bit, 32 for 3-bit).
    """
    reasons = []
    pack = Fraction(32, spec.bits).numerator
    if spec.group_size != -1 and in_features % spec.group_size:
        reasons.append(f"in_features {in_features} is not a multiple of the group size {spec.group_size}")
    if in_features % pack:
        reasons.append(f"in_features {in_features} is not a multiple of {pack}")
    if out_features % pack:
        reasons.append(f"out_features {out_features} is not a multiple of {pack}")
    return reasons
