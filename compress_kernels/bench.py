"""Kernel benchmarks: ``python -m compress_kernels.bench [--cpu] [--gpu] [--json PATH]``.

CPU: our int4 kernel against fp32 and bf16 F.linear (and, as peers, torch's packed-int4 CPU op and the
dequantize-then-F.linear reference) at M = 1 and 16 on the three LLaMA-7B projection shapes, all in one
process, calls interleaved, so every ratio compares runs made under the same machine load. The load
average is printed before and after.

GPU (CUDA): at M = 1 on 8192x8192 and 4096x14336 (g128, act-order) the achieved bandwidth of each
kernel with L2 flushed before every run, as GB/s and as a fraction of the HBM peak (``--peak-tbs``,
4.8 for an H200); speedups over cuBLAS fp16 at M = 1, 4, 16, 64, 128; NF4 against bitsandbytes'
``gemv_4bit`` (through ``bnb.matmul_4bit`` at one row) when bitsandbytes with CUDA is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from . import dispatch, reference

CPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # weight [N, K]: q/k/v/o, up/gate, down
GPU_SHAPES = [(8192, 8192), (14336, 4096)]
GPU_ROWS = [1, 4, 16, 64, 128]


def random_gptq(n: int, k: int, group: int = 128, act_order: bool = True, seed: int = 0, device="cpu") -> dict:
    """A random asymmetric int4 GPTQ layer [N, K] (v1 zeros), packed as checkpoints store it."""
    gen = torch.Generator().manual_seed(seed)
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int64)
    z = torch.randint(0, 16, (-(-k // group), n), generator=gen, dtype=torch.int64)
    shifts = (torch.arange(8) * 4).view(1, 8, 1)

    def pack(codes):  # along dim 0, 8 codes per int32 word
        rows = -(-codes.shape[0] // 8) * 8
        padded = torch.zeros(rows, codes.shape[1], dtype=torch.int64)
        padded[: codes.shape[0]] = codes
        words = (padded.view(-1, 8, codes.shape[1]) << shifts).sum(1)
        return (words - ((words >> 31) << 32)).to(torch.int32)

    layer = dict(qweight=pack(q), qzeros=pack(((z - 1) & 15).t()).t().contiguous(),
                 scales=(torch.rand(z.shape, generator=gen) * 0.01 + 0.001).half(), g_idx=g_idx.to(torch.int32),
                 bits=4, bias=None, zero_offset=1)
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in layer.items()}


def _interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median and best seconds of each callable, runs interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def cpu_table(repeats: int = 15, peers: bool = True) -> list[dict]:
    """One row per (shape, M): milliseconds (median) of each path and fp32 / int4 ratios."""
    rows = []
    for n, k in CPU_SHAPES:
        layer = random_gptq(n, k)
        cache: dict = {}
        w32 = reference.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, 1,
                                        torch.float32).contiguous()
        w16 = w32.bfloat16()
        packed = None
        if peers and hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
            packed = _torch_int4_peer(layer)
        for m in (1, 16):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            fns = {
                "fp32 F.linear": lambda: F.linear(x, w32),
                "bf16 F.linear": lambda: F.linear(xb, w16),
                "int4 (ours)": lambda: dispatch.gptq_matmul(x, **layer, force="cpu_int4", cache=cache),
            }
            if packed is not None:
                fns["torch int4pack (bf16)"] = lambda: packed(xb)
            if peers and m == 1:
                fns["dequant + F.linear"] = lambda: dispatch.gptq_matmul(x, **layer, force="reference")
            stats = _interleaved(fns, repeats if m == 1 else max(3, repeats // 3))
            row = {"shape": f"{n}x{k}", "M": m, **{f"{name} ms": round(v[0] * 1e3, 3) for name, v in stats.items()}}
            row["fp32 / int4"] = round(stats["fp32 F.linear"][0] / stats["int4 (ours)"][0], 2)
            row["fp32 / int4 (best runs)"] = round(stats["fp32 F.linear"][1] / stats["int4 (ours)"][1], 2)
            row["bf16 / int4"] = round(stats["bf16 F.linear"][0] / stats["int4 (ours)"][0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _torch_int4_peer(layer: dict):
    """torch's packed int4 CPU matmul for a plain-grouped copy of the layer's codes (a peer, not our path)."""
    k, n = layer["g_idx"].numel(), layer["scales"].shape[1]
    codes = reference.unpack_dim0(layer["qweight"], 4, k).t().contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([layer["scales"].float(), torch.zeros_like(layer["scales"].float())], -1).bfloat16()
    return lambda xb: torch._weight_int4pack_mm_for_cpu(xb, packed, 128, sz)


# ------------------------------------------------------------------------------------------------ GPU
def _cuda_time(fn, repeats: int, flush: torch.Tensor | None) -> float:
    """Median microseconds of fn() by CUDA events, L2 flushed (a buffer larger than L2 rewritten) first."""
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def gpu_tables(peak_tbs: float = 4.8, repeats: int = 50) -> dict:
    """Bandwidth at M=1, speedups over cuBLAS fp16 at several M, NF4 against bitsandbytes."""
    dev = torch.device("cuda")
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev)  # larger than any current L2
    out = {"device": torch.cuda.get_device_name(dev), "bandwidth": [], "speedup": [], "nf4": []}
    for n, k in GPU_SHAPES:
        layer = random_gptq(n, k, device=dev)
        w16 = reference.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, 1,
                                        torch.float16).contiguous()
        weight_bytes = sum(layer[key].numel() * layer[key].element_size() for key in ("qweight", "qzeros", "scales", "g_idx"))
        kernels = [name for name in ("cuda", "triton") if _runs(name, layer, dev)]
        caches = {name: {} for name in kernels}
        x1 = torch.randn(1, k, device=dev, dtype=torch.float16)
        for name in kernels:
            fn = lambda name=name: dispatch.gptq_matmul(x1, **layer, force=name, cache=caches[name])  # noqa: E731
            fn()
            us = _cuda_time(fn, repeats, flush)
            gbs = (weight_bytes + 2 * (k + n)) / (us * 1e-6) / 1e9
            out["bandwidth"].append({"shape": f"{n}x{k}", "kernel": name, "us": round(us, 2), "GB/s": round(gbs),
                                     "of peak": round(gbs / (peak_tbs * 1e3), 3)})
        cublas_us = _cuda_time(lambda: F.linear(x1, w16), repeats, flush)
        out["bandwidth"].append({"shape": f"{n}x{k}", "kernel": "cuBLAS fp16", "us": round(cublas_us, 2),
                                 "GB/s": round(2 * n * k / (cublas_us * 1e-6) / 1e9),
                                 "of peak": round(2 * n * k / (cublas_us * 1e-6) / 1e9 / (peak_tbs * 1e3), 3)})
        for m in GPU_ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            base = _cuda_time(lambda: F.linear(x, w16), repeats, flush)
            row = {"shape": f"{n}x{k}", "M": m, "cuBLAS fp16 us": round(base, 2)}
            for name in kernels:
                if name == "cuda" and m > 1:
                    continue
                us = _cuda_time(lambda name=name: dispatch.gptq_matmul(x, **layer, force=name, cache=caches[name]),
                                repeats, flush)
                row[f"{name} us"] = round(us, 2)
                row[f"{name} speedup"] = round(base / us, 2)
            out["speedup"].append(row)
            print(json.dumps(row), flush=True)
        out["nf4"].append(_nf4_vs_bitsandbytes(n, k, dev, repeats, flush))
    return out


def _runs(name: str, layer: dict, dev) -> bool:
    try:
        dispatch.gptq_matmul(torch.zeros(1, layer["g_idx"].numel(), device=dev, dtype=torch.float16), **layer, force=name)
        return True
    except Exception as exc:  # a kernel that cannot build or run here is reported, not fatal
        print(f"{name}: not available ({exc})")
        return False


def _nf4_vs_bitsandbytes(n: int, k: int, dev, repeats: int, flush) -> dict:
    from compress.quant.nf4 import quantize_weight

    w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
    result = quantize_weight(w, "nf4", 64, True)
    nested = result.nested
    layer = dict(packed=result.packed.to(dev), absmax=result.absmax.to(dev), quant_map=result.quant_map.to(dev),
                 shape=(n, k), blocksize=64, nested_absmax=nested.absmax.to(dev),
                 nested_quant_map=nested.quant_map.to(dev), offset=nested.offset.to(dev))
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    cache: dict = {}
    row = {"shape": f"{n}x{k}", "triton nf4 us": round(_cuda_time(
        lambda: dispatch.nf4_matmul(x, **layer, force="triton", cache=cache), repeats, flush), 2)}
    try:
        import bitsandbytes as bnb

        qw, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        row["bitsandbytes gemv_4bit us"] = round(_cuda_time(lambda: bnb.matmul_4bit(x, qw.t(), quant_state=state),
                                                            repeats, flush), 2)
        row["speedup"] = round(row["bitsandbytes gemv_4bit us"] / row["triton nf4 us"], 2)
    except Exception as exc:
        row["bitsandbytes"] = f"not available ({type(exc).__name__})"
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the CPU table (default when no GPU)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU tables (needs CUDA)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--peak-tbs", type=float, default=4.8, help="HBM peak of the GPU in TB/s (H200: 4.8)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    run_gpu = args.gpu or (not args.cpu and torch.cuda.is_available())
    run_cpu = args.cpu or not run_gpu
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    if run_cpu:
        results["load_before"] = os.getloadavg()
        results["cpu"] = cpu_table(args.repeats)
        results["load_after"] = os.getloadavg()
        print(f"load average before {results['load_before']}, after {results['load_after']}")
    if run_gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        results["gpu"] = gpu_tables(args.peak_tbs, max(args.repeats, 20))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
