"""A GGUF file read back into a Hugging Face model folder, so every command takes ``--model FILE.gguf``.

transformers reads the file (its own GGUF support: config, tokenizer, dequantized weights); this module
checks the file first, so that a damaged or unreadable one is one sentence, and saves what transformers
built: float safetensors, config.json without a quantization section, the tokenizer with its chat
template, and generation_config.json. A quantized file's weights are its quantized values, in float.

- :func:`read_gguf_info` checks a file (magic, header, architecture, tokenizer) without reading tensors.
- :func:`import_gguf` writes the folder into an empty folder; :func:`import_to` is ``compress import``.
- :func:`gguf_models` is the scope in which :func:`imported_folder` turns a GGUF path into a folder made
  once in a scratch location and removed when the scope ends (on errors and interrupts too).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressError

GGUF_MAGIC = b"GGUF"
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# llama.cpp architecture names transformers spells otherwise
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds, read from its header.

    Args:
        path: the file, absolute.
        architecture: llama.cpp's ``general.architecture`` (``llama``, ``qwen2``, ...).
        tensor_types: the ggml type of every tensor, by name (``F32``, ``Q4_1``, ...).
    """

    path: Path
    architecture: str
    tensor_types: dict[str, str]

    @property
    def quantized(self) -> bool:
        """True when some tensor is stored in a quantized type, not a float one."""
        return any(t not in FLOAT_TYPES for t in self.tensor_types.values())


def supported_architectures() -> list[str]:
    """The GGUF architectures this transformers reads into a causal LM, sorted (T5's encoder-decoders
    are read too, but not as the causal LM compress imports)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    with contextlib.suppress(ImportError):  # newer transformers read some architectures through a second table
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names |= set(GGUF_CONFIG_ARCHS)
    return sorted(n for n in names if "t5" not in n)


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Check that ``path`` is a complete GGUF file that transformers can read into a model with its tokenizer.

    Reads the header only (gguf.GGUFReader maps the file without loading tensors). Raises CompressError for
    a file that is not GGUF, a truncated one, an architecture transformers cannot read (naming those it
    can) and a file without a tokenizer.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise CompressError(f"GGUF file {path} does not exist" if not os.path.lexists(path)
                            else f"GGUF path {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CompressError(f"cannot read GGUF file {path} ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise CompressError(f"{path} is not a GGUF file: it does not start with the GGUF magic bytes")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CompressError("reading a GGUF file needs the gguf package: pip install 'compress[gguf]'") from None
    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        tensors = {t.name: t.tensor_type.name for t in reader.tensors}
        complete = all(t.data_offset + t.n_bytes <= size and t.data.nbytes == t.n_bytes for t in reader.tensors)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError):
        complete = False
    if not complete:
        raise CompressError(f"GGUF file {path} is truncated or damaged: its header or tensor data cannot be read "
                            f"in full")
    arch_field = reader.get_field("general.architecture")
    architecture = arch_field.contents() if arch_field is not None else None
    if not isinstance(architecture, str):
        raise CompressError(f"GGUF file {path} names no architecture (general.architecture), so it cannot be read "
                            f"as a model")
    supported = supported_architectures()
    if _ARCH_ALIASES.get(architecture, architecture) not in supported:
        raise CompressError(f"GGUF file {path} holds a '{architecture}' model, which transformers cannot read "
                            f"from GGUF as a causal LM; supported architectures: {', '.join(supported)}")
    if reader.get_field("tokenizer.ggml.model") is None:
        raise CompressError(f"GGUF file {path} holds no tokenizer (no tokenizer.ggml.model key); compress needs a "
                            f"GGUF that carries its tokenizer")
    return GGUFInfo(path, architecture, tensors)


def import_gguf(path: str | Path, folder: str | Path, info: GGUFInfo | None = None) -> GGUFInfo:
    """Write the model in the GGUF file ``path`` into the empty folder ``folder`` as a Hugging Face folder.

    Weights are saved in float32 safetensors (a quantized file's values, dequantized by transformers);
    config.json carries no quantization section; the tokenizer, its chat template and generation_config.json
    come with them. The file is checked first (:func:`read_gguf_info`, unless its ``info`` is given: parsing
    a large vocabulary's header takes seconds) and only read.
    """
    info = info or read_gguf_info(path)
    folder = Path(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(info.path.parent), info.path.name
    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, TypeError, NotImplementedError, OSError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CompressError(f"transformers cannot read the model in GGUF file {info.path}: {first}") from None
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions  # the GGUF's context length, not transformers' "unlimited"
    # the loaded model is plain float; without this transformers would save it as a GGUF-quantized checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _tidy_config(model.config)
    for key in ("is_local", "local_files_only"):  # how it was loaded here, not a property of the tokenizer
        tokenizer.init_kwargs.pop(key, None)
    with _quiet_progress():
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    if not (folder / "generation_config.json").is_file():
        model.generation_config.save_pretrained(str(folder))
    return info


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers' progress bars off while it reads the file (one line per tensor table otherwise)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _tidy_config(config) -> None:
    """Norm epsilons stored as float32 in GGUF (1e-6 reads back as 9.99999997e-07): their shortest float32 text."""
    import numpy as np

    for key, value in vars(config).items():
        if key.endswith("_eps") and isinstance(value, float):
            setattr(config, key, float(str(np.float32(value))))


def import_to(path: str | Path, out: str | Path, overwrite: bool = False) -> GGUFInfo:
    """``compress import``: the folder of :func:`import_gguf` written at ``out`` atomically, with compress's marker."""
    from ..outputs import atomic_output, check_output

    check_output(out, inputs=[path], overwrite=overwrite)
    info = read_gguf_info(path)  # before the claim and the temporary folder: a bad file leaves nothing behind
    with atomic_output(out, overwrite, inputs=[path], command="import") as tmp:
        return import_gguf(path, tmp, info)


# --------------------------------------------------------------------------------------------------
# GGUF files as model inputs


_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("compress_gguf_models", default=None)


@contextlib.contextmanager
def gguf_models() -> Iterator[None]:
    """A scope in which model paths may be GGUF files: each is imported once, on first use, into a
    scratch folder in the system temporary folder ($TMPDIR), removed when the scope ends."""
    stack = contextlib.ExitStack()
    token = _SCOPE.set({"stack": stack, "folders": {}})
    try:
        with stack:
            yield
    finally:
        _SCOPE.reset(token)


def imported_folder(path: str | Path) -> Path:
    """The Hugging Face folder for the GGUF file ``path``, imported inside the current :func:`gguf_models` scope."""
    scope = _SCOPE.get()
    real = Path(os.path.realpath(Path(path).expanduser()))
    if scope is None:
        raise CompressError(f"model {path} is a GGUF file; convert it first with `compress import {path} --out DIR` "
                            f"(or compress.gguf.importer.import_to) and pass that folder")
    if real not in scope["folders"]:
        import tempfile

        from ..outputs import remove_stale_temporaries, scratch_folder

        info = read_gguf_info(real)  # a bad file is one sentence before the scratch folder is made
        near = Path(tempfile.gettempdir()) / f"compress-gguf-{real.stem}"
        remove_stale_temporaries(near)  # what runs that died left behind
        # named as the file, so that summaries and the evaluation table name the model the user gave
        folder = scope["stack"].enter_context(scratch_folder(near)) / real.name
        folder.mkdir()
        import_gguf(real, folder, info)
        scope["folders"][real] = folder
    return scope["folders"][real]
