"""Run exported GGUF files in llama.cpp (through llama-cpp-python) and compare them with transformers.

These are the checks that make an export trustworthy: the real consumer loads the file, tokenizes like
the Hugging Face tokenizer, and computes the same logits (causal LMs) or pooled embeddings (BERT) on
the same tokens. Every function imports llama_cpp lazily; install it with ``pip install compress[llama]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CompressError


def open_model(path: str | Path, *, embedding: bool = False, n_ctx: int = 512, threads: int = 2):
    """A llama_cpp.Llama for ``path`` (all logits kept, quiet); CompressError when llama_cpp is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise CompressError("llama-cpp-python is not installed; run pip install 'compress[llama]'") from None
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=not embedding,
                               embedding=embedding, n_threads=threads, n_threads_batch=threads, verbose=False,
                               seed=0)
    except (ValueError, RuntimeError) as e:
        raise CompressError(f"llama.cpp cannot load {path} ({e})") from None


def tokenize(llm, text: str, add_special: bool = True) -> list[int]:
    """llama.cpp's token ids for ``text``; add_special adds bos/eos/sep as the model's metadata says."""
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)


def causal_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits float32 [len(ids), vocab] of a causal LM for the token ids, from a fresh context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def pooled_embeddings(llm, texts: list[str]) -> np.ndarray:
    """Pooled (not normalized) embeddings float32 [len(texts), dim], one text per call."""
    return np.array([llm.embed(t, normalize=False) for t in texts], dtype=np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean per-token KL(reference || other) in nats for logits [tokens, vocab]."""
    p = log_softmax(reference)
    q = log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(axis=-1).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [n, dim] arrays."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def perplexity(llm, ids: list[int], window: int) -> float:
    """Perplexity of ``ids`` in non-overlapping windows of ``window`` tokens (each scored from its start)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logp = log_softmax(causal_logits(llm, chunk))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def transformers_logits(model_dir: str | Path, ids: list[int] | list[list[int]]) -> np.ndarray | list[np.ndarray]:
    """float32 logits [len(ids), vocab] from transformers in float32 for the same ids.

    A list of id lists gives one array per list, with the model loaded once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    many = bool(ids) and isinstance(ids[0], list)
    with torch.no_grad():
        out = [model(torch.tensor([w])).logits[0].float().numpy() for w in (ids if many else [ids])]
    return out if many else out[0]


def transformers_embeddings(model_dir: str | Path, texts: list[str], pooling: int = 1) -> np.ndarray:
    """Mean (pooling 1) or CLS (pooling 2) pooled last hidden states [len(texts), dim] from transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            out.append((hidden.mean(0) if pooling == 1 else hidden[0]).numpy())
    return np.stack(out)
