"""Calibrated GGUF export: carry a GPTQ result into Q4_0/Q4_1 blocks, and importance matrices for k-quants.

- GPTQ with group size 32 stores per group of 32 inputs ``w = s*(q - z)``. GGUF's Q4_1 stores per 32
  weights ``w = d*q + m``: with d = s and m = -s*z the GPTQ codes go into the file unchanged, so the
  error GPTQ minimised on calibration data is the error llama.cpp sees (REFERENCES.md section 3). A
  symmetric GPTQ result (z = 8) is exactly Q4_0's ``w = d*(q - 8)``.
- An importance matrix is the mean square of each Linear input column over calibration text, taken
  block by block with the shared calibration runner (an observer that only accumulates); the k-quant
  encoders and the Q4_0/Q5_0 ones (k-quant mixes fall back to Q5_0 for short rows) weight their
  scale fit with it, as llama-quantize --imatrix does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CompressError


def unpack_rows(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [K*bits/32, N] packed along dim 0 (low bits first) -> codes int64 [K, N]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64).unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [G, N*bits/32] packed along dim 1 -> codes int64 [G, N]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64).unsqueeze(2) >> shifts.view(1, 1, per)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)


def legacy_blocks(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, symmetric: bool) -> np.ndarray:
    """Q4_0 (symmetric) or Q4_1 bytes [N, K/32 * (18 or 20)] from GPTQ codes [N, K], scales and zeros [N, K/32]."""
    n, k = codes.shape
    q = codes.reshape(n, k // 32, 32).astype(np.uint8)
    qs = q[:, :, :16] | (q[:, :, 16:] << 4)  # element j in the low nibble, j + 16 in the high one
    d = scales.astype(np.float16).reshape(n, -1, 1).view(np.uint8).reshape(n, -1, 2)
    if symmetric:
        return np.concatenate([d, qs], axis=2).reshape(n, -1)
    m = (-scales.astype(np.float32) * zeros).astype(np.float16).reshape(n, -1, 1).view(np.uint8).reshape(n, -1, 2)
    return np.concatenate([d, m, qs], axis=2).reshape(n, -1)


def gptq_blocks(model: str | Path, gptq: str | Path, export_type: str) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF tensor name -> (ggml type, raw blocks) for every layer of the GPTQ checkpoint ``gptq``.

    ``model`` is the floating-point folder the GPTQ checkpoint was made from (its other tensors and its
    tokenizer are exported as usual). The checkpoint must be 4-bit with group size 32 whose groups are
    runs of 32 columns in order (no act-order, or act-order with --static-groups, which solves columns
    in activation order but keeps the groups in place); export_type q4_1 takes any result, q4_0 a
    symmetric one.
    """
    from ..checkpoint import CheckpointReader
    from ..model_config import read_config_dict, shape_differences
    from ..quant.formats import GPTQFormat
    from .arch import detect

    gptq = Path(gptq).expanduser()
    config_path = gptq / "config.json"
    if not config_path.is_file():
        raise CompressError(f"{gptq} is not a model folder (no config.json)")
    gptq_config = read_config_dict(gptq)
    quant = gptq_config.get("quantization_config") or {}
    if quant.get("quant_method") != "gptq":
        raise CompressError(f"{gptq} is not a GPTQ checkpoint; make one with compress quantize --method gptq --group-size 32")
    fmt = GPTQFormat.from_config(quant)
    if fmt.bits != 4 or fmt.group_size != 32 or fmt.dynamic:
        raise CompressError(f"GGUF blocks hold 4-bit groups of 32 in order; {gptq} has {fmt.bits} bits, group size "
                            f"{fmt.group_size}: quantize with --bits 4 --group-size 32")
    if export_type not in ("q4_0", "q4_1"):
        raise CompressError(f"a GPTQ checkpoint is carried into q4_0 or q4_1 blocks, not {export_type}")
    if export_type == "q4_0" and not fmt.sym:
        raise CompressError("an asymmetric GPTQ checkpoint needs --type q4_1 (Q4_0 has no zero point)")
    arch = detect(Path(model).expanduser())
    differences = shape_differences(arch.config, gptq_config)
    if differences:
        raise CompressError(f"{gptq} was not made from {Path(model).name}: its config has {differences[0]}")
    out = {}
    with CheckpointReader(gptq) as reader, CheckpointReader(Path(model).expanduser()) as floats:
        layers = [(k[: -len(".qweight")], arch.tensor_names(k[: -len(".qweight")] + ".weight"))
                  for k in reader.keys() if k.endswith(".qweight")]
        layers = [(prefix, name) for prefix, name in layers if name is not None]
        for prefix, name in layers:  # every layer's shapes before any is read
            check_gptq_layer(reader, prefix, arch.shapes[name].shape, gptq)
        for prefix, name in layers:
            key = prefix + ".qweight"
            codes = unpack_rows(reader.get(key)).t().numpy()  # [N, K]
            scales = reader.get(prefix + ".scales").float().t().numpy()  # [N, G]
            zeros = (unpack_cols(reader.get(prefix + ".qzeros")) + fmt.zero_offset).t().numpy().astype(np.float32)
            g_idx = reader.get(prefix + ".g_idx").numpy() if prefix + ".g_idx" in reader else None
            if g_idx is not None and not np.array_equal(g_idx, np.arange(codes.shape[1]) // 32):
                raise CompressError(f"layer {prefix} has act-order groups out of column order, which GGUF blocks cannot "
                                    f"hold: quantize with --static-groups (or without --act-order)")
            symmetric = export_type == "q4_0"
            if symmetric and not np.all(zeros == 8):
                raise CompressError(f"layer {prefix} has zero points other than 8; use --type q4_1")
            if prefix + ".weight" in floats:
                check_same_weights(prefix, codes, scales, zeros, floats.get(prefix + ".weight").float().numpy(), gptq, model)
            blocks = legacy_blocks(codes, scales, zeros, symmetric)
            out[name] = ("Q4_0" if symmetric else "Q4_1", arch.transform(name, blocks))
    if not out:
        raise CompressError(f"{gptq} holds no quantized layer this model's GGUF graph uses")
    return out


# cosine of a layer's float weight and its GPTQ dequantization: 4-bit keeps it near 0.99 and even 2-bit
# above 0.8, while another model's weights of the same shape are unrelated (cosine near 0)
SAME_WEIGHTS_COSINE = 0.5


def check_same_weights(prefix: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, weight: np.ndarray,
                       gptq: Path, model) -> None:
    """Refuse a GPTQ layer (codes [N, K], scales and zeros [N, K/32]) that does not approximate ``weight`` [N, K]."""
    dequantized = np.repeat(scales, 32, axis=1) * (codes - np.repeat(zeros, 32, axis=1))
    a, b = weight.astype(np.float64).ravel(), dequantized.astype(np.float64).ravel()
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    if cosine < SAME_WEIGHTS_COSINE:
        raise CompressError(f"{gptq} was not made from {Path(model).name}: its layer {prefix} has a cosine of "
                            f"{cosine:.2f} with the float weights (a quantization of them keeps above 0.8)")


def check_gptq_layer(reader, prefix: str, shape: tuple[int, int], gptq: Path) -> None:
    """Refuse a 4-bit, group-32 layer whose qweight, scales or qzeros do not fit the float weight [N, K]."""
    n, k = shape
    if k % 32:
        raise CompressError(f"layer {prefix} has {k} inputs, not a multiple of 32")
    want = {"qweight": (k // 8, n), "scales": (k // 32, n), "qzeros": (k // 32, -(-n // 8))}
    for suffix, expected in want.items():
        key = f"{prefix}.{suffix}"
        if key not in reader:
            raise CompressError(f"{gptq} has no {key}; the GPTQ checkpoint is incomplete")
        stored = tuple(reader.info(key)[1])
        if stored != expected:
            raise CompressError(f"GPTQ tensor {key} in {gptq} has shape {stored} but a {n} x {k} layer needs {expected}; "
                                "the checkpoint does not belong to this model")


class SquareObserver:
    """Accumulates the sum of squares of each input column (the diagonal of X^T X) and the row count."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.sum += (x * x).sum(0)
        self.count += x.shape[0]


class ImportanceMethod:
    """A calibration-runner method that changes nothing and returns each Linear's mean squared input."""

    def wants(self, name: str) -> bool:
        return True

    def observer(self, in_features: int, device: torch.device) -> SquareObserver:
        return SquareObserver(in_features, device)

    def solve(self, name: str, weight: torch.Tensor, observer: SquareObserver):
        return weight, (observer.sum / max(1, observer.count)).float().cpu().numpy()


def importance_matrix(model: str | Path, source: str = "builtin", *, nsamples: int = 64, seqlen: int = 256,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input per column [in_features] of each Linear in the blocks."""
    from ..calibrate import Runner
    from ..checkpoint import CheckpointReader
    from ..data import calibration
    from ..models import build_skeleton, checkpoint_key_map, detect_kind, load_config, load_tokenizer, read_config_dict
    from .arch import detect

    folder = Path(model).expanduser()
    arch = detect(folder)
    if arch.name == "bert":
        raise CompressError("importance matrices are computed for causal LMs; export BERT without --imatrix")
    samples = calibration(load_tokenizer(folder), source, nsamples, seqlen, seed)
    out = {}
    with CheckpointReader(folder) as reader:
        skeleton = build_skeleton(load_config(folder), detect_kind(folder, read_config_dict(folder)))
        key_of = checkpoint_key_map(skeleton, reader.keys())
        runner = Runner(skeleton, reader, key_of, device=torch.device("cpu"), dtype=torch.float32, true_sequential=False)
        for block in runner.run(samples, ImportanceMethod()):
            for layer, values in block.payloads.items():
                name = arch.tensor_names(key_of.get(f"{layer}.weight", f"{layer}.weight"))
                if name is not None:
                    out[name] = values
    return out
