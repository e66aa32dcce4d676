"""Hugging Face folder -> one GGUF file, tensor by tensor.

The export runs in two passes over the checkpoint. The first reads only names, dtypes and shapes
(``CheckpointReader.info``) and decides each tensor's GGUF name and type, so the header, metadata and
tensor table can be written before any weight is loaded. The second loads one tensor at a time,
converts it (rotary permutation, float or block quantization) and appends its bytes; memory holds one
tensor and its encoding, whatever the model's size. The file is written to a temporary sibling and
renamed into place only when complete.

Type choice per tensor, as llama.cpp makes it:
- vectors (norms, biases) stay float32, as do BERT's position and token-type tables;
- matrices take the requested type, except the output matrix (or the token embedding tied to it),
  which every quantized type writes as Q6_K (Q8_0 stays Q8_0), as llama-quantize does; the mixes
  q4_k_m / q5_k_m also give attn_v / ffn_down of the first and last eighth of the layers (and every
  third one between) Q6_K;
- a matrix whose rows do not split into whole blocks falls back (Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, and to F16 when even 32 does not divide the row), and the report lists it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CompressError
from ..model_config import check_tensors

# export type -> (ggml type of matrices, llama.cpp file type); the mixes pick per tensor
TYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q4_k": ("Q4_K", "MOSTLY_Q4_K_S"),
    "q5_k": ("Q5_K", "MOSTLY_Q5_K_S"), "q6_k": ("Q6_K", "MOSTLY_Q6_K"), "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
}
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
         "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass
class TensorPlan:
    hf_name: str
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (rows first)
    ggml_type: str
    wanted: str  # the type the policy asked for before any fallback


@dataclass
class ExportReport:
    """What was written: per-tensor types, fallbacks, sizes (bytes) and time (seconds)."""

    path: Path
    arch: str
    export_type: str
    tensors: list[TensorPlan]
    file_bytes: int = 0
    n_weights: int = 0
    seconds: float = 0.0
    type_counts: dict[str, int] = field(default_factory=dict)

    @property
    def fallbacks(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.ggml_type != t.wanted]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.file_bytes / max(1, self.n_weights)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts.items()))
        lines = [f"wrote {self.path} ({self.arch}, {self.export_type}): {len(self.tensors)} tensors ({counts}), "
                 f"{self.file_bytes / 1e6:.2f} MB, {self.bits_per_weight:.2f} bits per weight, {self.seconds:.1f} s"]
        groups: dict[tuple[str, int, str], list[str]] = {}
        for t in self.fallbacks:
            groups.setdefault((t.wanted, t.shape[-1], t.ggml_type), []).append(t.name)
        for (wanted, row, got), names in groups.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"  rows of {row} do not split into {wanted} blocks of {BLOCK[wanted]}: "
                         f"{len(names)} tensor(s) written as {got} ({shown})")
        return "\n".join(lines)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers a _M mix gives more bits: first and last eighth, every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def choose_type(name: str, shape: tuple[int, ...], export_type: str, n_layers: int, tied_output: bool,
                calibrated: bool = False) -> str:
    """The ggml type the policy wants for tensor ``name`` (before the row-length fallback).

    calibrated: an importance matrix steers the encoding (llama-quantize --imatrix), which changes the mix.
    """
    from .arch import ALWAYS_F32

    base = TYPES[export_type][0]
    if len(shape) < 2 or name in ALWAYS_F32 or export_type == "f32":
        return "F32"
    if base in ("F16", "BF16"):
        return base
    # the output matrix (the token embedding too when the two are tied) keeps 6 bits or more in every
    # quantized type, as llama-quantize decides: 4-bit logits cost far more than 4-bit blocks elsewhere
    if name == "output.weight" or (tied_output and name == "token_embd.weight"):
        return base if base == "Q8_0" else "Q6_K" if shape[-1] % BLOCK[base] == 0 else "Q8_0"
    parts = name.split(".")
    if calibrated and export_type in ("q4_0", "q5_0") and parts[0] == "blk" and parts[2] == "ffn_down" \
            and int(parts[1]) < n_layers // 8:
        # llama-quantize's guard for the first ffn_down layers, which go astray even with an importance matrix
        return "Q4_1" if export_type == "q4_0" else "Q5_1"
    if export_type.endswith("_m"):
        if parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and use_more_bits(int(parts[1]), n_layers):
            return "Q6_K"
    return base


def fit_to_rows(ggml_type: str, row: int) -> str:
    """The type actually written for rows of ``row`` values: ``ggml_type`` or its fallback."""
    if row % BLOCK[ggml_type] == 0:
        return ggml_type
    fallback = FALLBACK.get(ggml_type)
    if fallback is not None and row % BLOCK[fallback] == 0:
        return fallback
    return "F16"


def encode(data: np.ndarray, ggml_type: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, cols] -> the array GGUF stores: float values, or uint8 [rows, bytes per row] blocks."""
    import gguf

    if ggml_type == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == "F16":
        return np.ascontiguousarray(data, dtype=np.float16)
    if ggml_type in ("Q4_K", "Q5_K", "Q6_K"):
        from .kquants import ENCODERS

        return ENCODERS[ggml_type](data.reshape(-1, data.shape[-1]), importance).reshape(*data.shape[:-1], -1)
    if importance is not None and ggml_type in ("Q4_0", "Q5_0"):  # importance-weighted scale search
        from .legacy import ENCODERS

        return ENCODERS[ggml_type](data.reshape(-1, data.shape[-1]), importance).reshape(*data.shape[:-1], -1)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType[ggml_type])


def nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def plan(reader, arch, export_type: str, calibrated: bool = False) -> list[TensorPlan]:
    """Names and types of every tensor to write, from shapes alone (no weight is loaded)."""
    out = []
    for hf_name in reader.keys():
        name = arch.tensor_names(hf_name)
        if name is None:
            continue
        is_float, shape = reader.info(hf_name)
        if not is_float:
            raise CompressError(f"tensor {hf_name} is not floating point; GGUF export needs a floating-point checkpoint")
        wanted = choose_type(name, shape, export_type, arch.n_layers, arch.tied_output, calibrated)
        out.append(TensorPlan(hf_name, name, tuple(shape), fit_to_rows(wanted, shape[-1]), wanted))
    check_tensors(arch.shapes, {t.name: (t.hf_name, "float", True, t.shape) for t in out}, reader.folder)
    return out


def check_source(model: str | Path, export_type: str = "f16") -> None:
    """export_gguf's checks of the input folder (config, tokenizer, every tensor's dtype and shape) from
    headers alone, for callers that do other work with the folder first."""
    from .arch import detect
    from .source import open_tensors
    from .tokenizer import read_vocab

    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise CompressError(f"model folder {folder} does not exist")
    arch = detect(folder)
    read_vocab(folder, arch.config.get("vocab_size"))
    with open_tensors(folder) as reader:
        plan(reader, arch, export_type)


def export_gguf(model: str | Path, out: str | Path, export_type: str = "f16", *, overwrite: bool = False,
                importance: dict[str, np.ndarray] | None = None, replace: dict | None = None,
                progress: bool = False) -> ExportReport:
    """Write the Hugging Face model folder ``model`` as a GGUF file ``out`` of ``export_type``.

    export_type: one of TYPES (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m,
    q5_k_m). importance: optional GGUF tensor name -> per-input-column weights [cols] that steer the
    k-quant scale search. replace: optional GGUF tensor name -> (ggml type, raw bytes array) written
    as given instead of encoding the float tensor (used to carry an already quantized result).
    Returns an :class:`ExportReport`; raises CompressError for unsupported models, tokenizers, types
    or unwritable outputs, leaving no partial file.
    """
    import gguf

    from ..outputs import GGUF_MARKER_KEY, atomic_output, check_output, output_marker
    from .arch import detect
    from .source import open_tensors
    from .tokenizer import read_vocab

    start = time.perf_counter()
    if export_type not in TYPES:
        raise CompressError(f"unknown GGUF type '{export_type}'; choose one of {', '.join(TYPES)}")
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise CompressError(f"model folder {folder} does not exist")
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise CompressError(f"output {out} must be a .gguf file path")
    check_output(out, inputs=[folder], overwrite=overwrite, is_file=True)
    arch = detect(folder)
    vocab = read_vocab(folder, arch.config.get("vocab_size"))
    replace = replace or {}
    with open_tensors(folder) as reader:
        tensors = plan(reader, arch, export_type, calibrated=importance is not None)
        for t in tensors:
            if t.name in replace:
                t.ggml_type = t.wanted = replace[t.name][0]
        with atomic_output(out, overwrite=overwrite, is_file=True, inputs=[folder]) as tmp, _os_errors(out):
            writer = gguf.GGUFWriter(tmp, arch.name)
            writer.add_string(GGUF_MARKER_KEY, json.dumps(output_marker("export gguf")))  # what --overwrite may replace
            writer.add_name(folder.name)
            writer.add_file_type(int(gguf.LlamaFileType[TYPES[export_type][1]]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            arch.write_metadata(writer)
            vocab.write(writer)
            for t in tensors:
                qtype = gguf.GGMLQuantizationType[t.ggml_type]
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.ggml_type), raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = _progress(len(tensors)) if progress else None
            for t in tensors:
                if t.name in replace:
                    data = np.ascontiguousarray(replace[t.name][1])
                else:
                    values = reader.get(t.hf_name)
                    if not np.isfinite(values).all():
                        raise CompressError(f"tensor {t.hf_name} contains NaN or Inf values; the model is damaged")
                    values = arch.transform(t.name, values)
                    data = encode(values, t.ggml_type, (importance or {}).get(t.name))
                    del values
                if data.nbytes != nbytes(t.shape, t.ggml_type):
                    raise CompressError(f"tensor {t.name} encoded to {data.nbytes} bytes, expected {nbytes(t.shape, t.ggml_type)}")
                writer.write_tensor_data(data)
                if bar is not None:
                    bar.update(1)
            writer.close()
            if bar is not None:
                bar.close()
    report = ExportReport(out.absolute(), arch.name, export_type, tensors, file_bytes=out.stat().st_size,
                          n_weights=sum(int(np.prod(t.shape)) for t in tensors), seconds=time.perf_counter() - start)
    for t in tensors:
        report.type_counts[t.ggml_type] = report.type_counts.get(t.ggml_type, 0) + 1
    return report


@contextlib.contextmanager
def _os_errors(out: Path):
    """A full disk or a vanished folder while writing becomes one sentence, not a traceback."""
    try:
        yield
    except OSError as e:
        raise CompressError(f"cannot write {out} ({e.strerror or e})") from None


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="export", unit="tensor")
