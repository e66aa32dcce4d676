"""Size, bits per weight, parameter count, peak memory and latency of a model.

Sizes and bits per weight are read from the files on disk, not from the modules in memory, so they are
what a user downloads and what a format really costs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import is_weight_file, safetensors_header
from ..models import LoadedModel, block_linears, find_blocks, linear_types
from ..memory import release_free_memory
from ..quant.linear import QuantModule

# tensors that are the same fixed lookup table in every layer (a reader could share one copy)
_SHARED_TABLE_SUFFIXES = ("quant_map", "nested_quant_map")
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


def folder_bytes(path: Path) -> int:
    """Bytes of every file in a model folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weights_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors, bin, gguf) of a model folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and is_weight_file(p) and not p.name.endswith(".json"))


def _tensor_bits(entry: dict) -> int:
    n = 1
    for d in entry["shape"]:
        n *= d
    return n * _DTYPE_BITS.get(entry["dtype"], 32)


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers a quantizer targets: runtime quantized modules, else the Linears in the blocks."""
    quant = [name for name, m in model.named_modules() if isinstance(m, QuantModule)]
    if quant:
        return quant
    try:
        return [name for block in block_linears(model) for name in block]
    except Exception:  # a model with no block list: every Linear outside the output head
        return [name for name, m in model.named_modules() if isinstance(m, linear_types())]


def bits_per_weight(loaded: LoadedModel) -> float | None:
    """Stored bits per weight of the quantized layers (or of the Linears in the blocks, unquantized).

    Counts every tensor a layer stores (packed codes, scales, zero points, absmax constants, g_idx),
    except its bias and the fixed code tables every layer repeats. None for non-safetensors folders.
    """
    headers = {}
    for f in sorted(loaded.path.glob("*.safetensors")):
        headers.update(safetensors_header(f))
    if not headers:
        return None
    model = loaded.model
    prefix = getattr(model, "base_model_prefix", "")
    total_bits, total_weights = 0, 0
    for name in quantized_layer_names(model):
        module = model.get_submodule(name)
        name = name.removesuffix(".base_layer")  # a layer wrapped by LoRA adapters is stored under its own name
        keys = [k for k in (f"{name}.", f"{name[len(prefix) + 1:]}." if prefix and name.startswith(prefix + ".") else None,
                            f"{prefix}.{name}." if prefix else None) if k]
        entries = {}
        for k in keys:
            entries = {h: e for h, e in headers.items() if h.startswith(k)}
            if entries:
                break
        if not entries:
            continue
        bits = sum(_tensor_bits(e) for h, e in entries.items()
                   if not h.endswith(".bias") and not h.endswith(_SHARED_TABLE_SUFFIXES) and "quant_state" not in h)
        total_bits += bits
        total_weights += module.num_weights if isinstance(module, QuantModule) else module.weight.numel()
    return total_bits / total_weights if total_weights else None


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model as a dense model would count them (quantized layers count K x N + bias)."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantModule):
            total += module.num_weights + (module.out_features if module.bias is not None else 0)
    return total


class PeakMemory:
    """Memory growth while a block runs, relative to what was in use when it started.

    ``peak``: the highest growth reached; ``end``: the growth still held at exit (for a model load: the
    model's resident size). On CUDA: torch's allocated bytes. On Linux CPUs: the process's resident set,
    whose peak is reset at entry through /proc/self/clear_refs; elsewhere both stay None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self.end: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._ok = _reset_peak_rss()
            self._base = _rss("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.end = torch.cuda.memory_allocated(self.device) - self._base
        elif self._ok and self._base is not None:
            hwm, now = _rss("VmHWM"), _rss("VmRSS")
            self.peak = max(0, hwm - self._base) if hwm is not None else None
            self.end = max(0, now - self._base) if now is not None else None
        return False


def _rss(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def causal_latency(loaded: LoadedModel, seqlen: int, decode_tokens: int, repeats: int, warmup: int) -> dict:
    """Prefill time for ``seqlen`` tokens and greedy decode speed at batch 1."""
    model, device = loaded.model, loaded.device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefill_len = min(seqlen, loaded.max_positions())
    prompt = torch.randint(0, vocab, (1, prefill_len), generator=gen).to(device)
    prefill = timed(lambda: model(input_ids=prompt, use_cache=False), device, repeats, warmup)
    prompt_len = min(16, max(1, loaded.max_positions() - decode_tokens))
    steps = max(1, min(decode_tokens, loaded.max_positions() - prompt_len))
    start_ids = prompt[:, :prompt_len]

    return {"prefill_ms": prefill * 1e3, "prefill_tokens": prefill_len,
            "decode_tok_s": _decode_tok_s(model, device, start_ids, steps, repeats, warmup)}


def _decode_tok_s(model, device, start_ids, steps: int, repeats: int, warmup: int) -> float:
    """Greedy decode speed at batch 1 after a prompt (the prompt's own forward pass is subtracted)."""

    def decode():
        out = model(input_ids=start_ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    total = timed(decode, device, max(1, repeats // 2), min(warmup, 1))
    first = timed(lambda: model(input_ids=start_ids, use_cache=True), device, max(1, repeats // 2), 0)
    return steps / max(total - first, 1e-9)


def kernel_backends(model: nn.Module, device: torch.device) -> list[str]:
    """4-bit kernels (compress_kernels.dispatch) that can run every GPTQ-layout layer of the model on
    ``device`` at batch 1, best first; empty for models without such layers."""
    from compress_kernels import dispatch

    from ..quant.linear import QuantLinear

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    names = None
    for module in model.modules():
        if isinstance(module, QuantLinear):
            x = torch.zeros(1, module.in_features, device=device, dtype=dtype)
            here = dispatch.usable_backends(x, cache=module._kernel_cache, qweight=module.qweight, qzeros=module.qzeros,
                                            scales=module.scales, g_idx=module.g_idx, bits=module.bits, bias=module.bias,
                                            zero_offset=module.zero_offset)
            names = here if names is None else [n for n in names if n in here]
    return names or []


@torch.inference_mode()
def decode_by_kernel(loaded: LoadedModel, decode_tokens: int, repeats: int, warmup: int) -> dict:
    """Decode tokens/s of a model with 4-bit layers under each kernel that can run it (two or more)."""
    from compress_kernels import dispatch

    model, device = loaded.model, loaded.device
    names = kernel_backends(model, device)
    if len(names) < 2:
        return {}
    prompt_len = min(16, max(1, loaded.max_positions() - decode_tokens))
    steps = max(1, min(decode_tokens, loaded.max_positions() - prompt_len))
    gen = torch.Generator().manual_seed(0)
    start_ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).to(device)
    speeds = {}
    for name in names:
        with dispatch.forced(name, strict=False):  # a one-row kernel leaves the prompt to the automatic choice
            speeds[name] = _decode_tok_s(model, device, start_ids, steps, repeats, warmup)
    return {"decode_tok_s_by_kernel": speeds}


@torch.inference_mode()
def encoder_latency(loaded: LoadedModel, batch_size: int, seqlen: int, repeats: int, warmup: int) -> dict:
    """Milliseconds per forward pass of a batch_size x seqlen batch."""
    model, device = loaded.model, loaded.device
    seqlen = min(seqlen, loaded.max_positions())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if model.config.vocab_size > 2000 else 0, model.config.vocab_size,
                        (batch_size, seqlen), generator=gen).to(device)
    mask = torch.ones_like(ids)
    seconds = timed(lambda: model(input_ids=ids, attention_mask=mask), device, repeats, warmup)
    return {"batch_ms": seconds * 1e3, "batch": f"{batch_size}x{seqlen}"}


def block_count(model: nn.Module) -> int | None:
    try:
        return len(find_blocks(model)[1])
    except Exception:
        return None
