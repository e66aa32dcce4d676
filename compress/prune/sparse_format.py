"""Compressed storage of sparse weights: a bitmask plus the nonzero values, so the file really shrinks.

A sparse weight ``T`` of shape [N, K] (``T`` is its checkpoint key, e.g. ``model.layers.0.mlp.up_proj.weight``)
is stored as three safetensors entries instead of one:

    T_bitmask  uint8 [N, ceil(K / 8)]  bit j % 8 of byte j // 8 of row i is 1 when W[i, j] is kept
                                       (least significant bit first)
    T_values   dtype [nnz]             the kept weights in row-major order, in the weight's own dtype
    T_shape    int64 [2]               N, K

A float16 weight at 50% sparsity costs 1 + 8 = 9 bits per weight instead of 16; float32, 17 instead of
32. A layer is written this way only when that is smaller than its dense form. config.json carries
``sparsity_config`` (format ``bitmask``, the method, the target and the measured sparsity of each layer).
:class:`compress.checkpoint.CheckpointReader` decodes these entries transparently, so ``compress.load``,
``compress quantize`` and the harness see ordinary dense tensors, and the harness's size column is the
true file size. Readers that do not go through it need the dense storage (``--storage dense``).
"""

from __future__ import annotations

import torch

FORMAT = "bitmask"
VERSION = 1
SUFFIXES = ("_bitmask", "_values", "_shape")
_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask [N, K] -> uint8 [N, ceil(K/8)], least significant bit first."""
    rows, cols = mask.shape
    pad = -cols % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] -> bool mask [N, K] (inverse of pack_mask)."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(packed.shape[0], -1)[:, :cols]


def encode(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three entries (by suffix) that store ``weight`` [N, K]; its zeros are the pruned weights."""
    w = weight.detach().cpu().contiguous()
    mask = w != 0
    return {"_bitmask": pack_mask(mask), "_values": w[mask].contiguous(),
            "_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def decode(bitmask: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The dense weight the three entries describe (exactly the one encoded)."""
    rows, cols = (int(x) for x in shape.tolist())
    mask = unpack_mask(bitmask, cols)
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values
    return dense


def stored_bytes(weight: torch.Tensor) -> tuple[int, int]:
    """(bytes dense, bytes as bitmask + values) of a 2-D weight, without encoding it."""
    n, k = weight.shape
    nnz = int((weight != 0).sum())
    size = weight.element_size()
    return n * k * size, n * (-(-k // 8)) + nnz * size + 16


def worth_compressing(weight: torch.Tensor) -> bool:
    """True when bitmask + values is smaller than the dense tensor."""
    if weight.dim() != 2 or not weight.is_floating_point():
        return False
    dense, sparse = stored_bytes(weight)
    return sparse < dense


def add_weight(writer, key: str, weight: torch.Tensor, compress: bool = True) -> bool:
    """Write ``weight`` under checkpoint key ``key``: compressed when ``compress`` and it pays, else dense.

    Returns whether it was stored compressed.
    """
    if compress and worth_compressing(weight):
        for suffix, value in encode(weight).items():
            writer.add(key + suffix, value)
        return True
    writer.add(key, weight)
    return False


def sparse_entries(keys) -> dict[str, tuple[str, str, str]]:
    """Dense key -> (bitmask key, values key, shape key) for every complete triple among ``keys``."""
    keys = set(keys)
    out = {}
    for k in keys:
        if k.endswith("_bitmask"):
            base = k[: -len("_bitmask")]
            parts = (k, base + "_values", base + "_shape")
            if parts[1] in keys and parts[2] in keys:
                out[base] = parts
    return out


def sparsity_config(method: str, target: str, layers: dict[str, tuple[int, int]], compressed: bool, **extra) -> dict:
    """The ``sparsity_config`` section of config.json.

    Args:
        method: how the masks were chosen (magnitude, wanda, sparsegpt).
        target: the requested sparsity ('50%') or pattern ('2:4').
        layers: checkpoint key of each pruned weight -> (its zeros, its weights).
        compressed: whether weights are stored as bitmask + values (format 'bitmask') or dense.
    """
    zeros = sum(z for z, _ in layers.values())
    total = sum(n for _, n in layers.values())
    return {"format": FORMAT if compressed else "dense", "version": VERSION, "method": method, "target": target,
            "sparsity": round(zeros / total, 6) if total else 0.0, **extra,
            "layers": {k: round(z / n, 6) for k, (z, n) in sorted(layers.items())}}
