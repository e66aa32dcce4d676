import hashlib
import os
from pathlib import Path

# Triton reads its interpreter switch once, when it is first imported, and libraries imported while the
# tests are collected (transformers, accelerate, bitsandbytes) may import it: set it before any of them.
# Without a GPU the Triton kernels can only run in the interpreter.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tiny  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, kind=None) -> folder of a tiny saved model, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def make(arch: str, kind: str | None = None) -> Path:
        key = (arch, kind)
        if key not in made:
            made[key] = tiny.build(arch, root / f"{arch}-{kind or 'default'}", kind)
        return made[key]

    return make


@pytest.fixture(scope="session")
def minilm():
    from compress.models import default_model_path

    return default_model_path()


def tree_hash(path: Path) -> str:
    """Hash of every file's name, mode and content below ``path``."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(oct(p.stat().st_mode).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def hash_tree():
    return tree_hash


@pytest.fixture(scope="session")
def fast_eval():
    from compress.config import EvalConfig

    return EvalConfig(ppl_tokens=512, kl_tokens=256, seqlen=64, samples=24, batch_size=8, latency_seqlen=32,
                      decode_tokens=4, repeats=1, warmup=0, device="cpu")
