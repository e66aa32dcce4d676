"""Run exported GGUF files in llama.cpp (through llama-cpp-python) and compare them with transformers.

These are the checks that make an export trustworthy: the real consumer loads the file, tokenizes like
the Hugging Face tokenizer, and computes the same logits (causal LMs) or pooled embeddings (BERT) on
the same tokens. llama.cpp runs in a child process (:class:`LlamaProcess`), so a native crash fails one
check with one sentence instead of ending the caller; install it with ``pip install compress[llama]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CompressError


class LlamaProcess:
    """A GGUF file loaded by llama.cpp in a child process (see :mod:`compress.gguf.llama_worker`).

    A crash of the native code (SIGSEGV, SIGILL) ends the child, not the caller: the call that was
    waiting raises one CompressError naming the signal. Use it as a context manager or call close().
    """

    def __init__(self, path: str | Path, *, embedding: bool = False, n_ctx: int = 512, threads: int = 2,
                 timeout: float = 900.0):
        self.path = str(path)
        self.timeout = timeout
        self._child = _start_worker()
        self._request({"op": "open", "path": self.path, "embedding": embedding, "n_ctx": n_ctx, "threads": threads},
                      f"loading {self.path}")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's token ids for ``text``; add_special adds bos/eos/sep as the model's metadata says,
        parse_special reads special tokens written in the text (``<|im_start|>``) as those tokens."""
        return self._request({"op": "tokenize", "text": text, "add_special": add_special, "parse_special": parse_special},
                             "tokenizing")[0]["ids"]

    def chat(self, messages: list[dict], max_tokens: int = 32) -> dict:
        """A greedy answer to ``messages`` (role/content dicts) through llama-cpp-python's chat API.

        Returns format (the chat format it chose: "chat_template.default" for the file's own
        tokenizer.chat_template, "llama-2" when the file has none), prompt (the text that format
        renders) and text (the answer).
        """
        return self._request({"op": "chat", "messages": messages, "max_tokens": max_tokens}, "chatting")[0]

    def causal_logits(self, ids: list[int]) -> np.ndarray:
        """Logits float32 [len(ids), vocab] of a causal LM for the token ids, from a fresh context."""
        return self._request({"op": "logits", "ids": [int(i) for i in ids]}, f"evaluating {len(ids)} tokens")[1]

    def pooled_embeddings(self, texts: list[str]) -> np.ndarray:
        """Pooled (not normalized) embeddings float32 [len(texts), dim], one text per call."""
        return self._request({"op": "embed", "texts": list(texts)}, f"embedding {len(texts)} texts")[1]

    def close(self) -> None:
        """End the child (politely, then by force)."""
        if self._child is None:
            return
        child, self._child = self._child, None
        _stop_worker(child)

    def __enter__(self) -> "LlamaProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _request(self, message: dict, doing: str):
        if self._child is None:
            raise CompressError(f"the llama.cpp process for {self.path} is closed")
        return _call(self._child, message, f"{doing} with {self.path}", self.timeout,
                     on_death=lambda: setattr(self, "_child", None))


def _start_worker():
    import importlib.util
    import subprocess
    import sys

    # looked up, not imported: the native library is loaded only in the child
    if importlib.util.find_spec("llama_cpp") is None:
        raise CompressError("llama-cpp-python is not installed; run pip install 'compress[llama]'")
    return subprocess.Popen([sys.executable, "-m", "compress.gguf.llama_worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)


def _stop_worker(child) -> None:
    import subprocess

    try:
        from .llama_worker import send

        send(child.stdin, {"op": "close"})
        child.stdin.close()
        child.wait(timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        child.kill()
        child.wait()
    finally:
        child.stdout.close()


def _call(child, message: dict, doing: str, timeout: float, on_death=None):
    """Send one request and wait for its reply; the child's death or silence becomes a CompressError."""
    import select
    import signal

    from .llama_worker import receive, send

    try:
        send(child.stdin, message)
        ready, _, _ = select.select([child.stdout], [], [], timeout)
        if not ready:
            child.kill()
            raise TimeoutError
        reply, array = receive(child.stdout)
    except (OSError, EOFError, ValueError, TimeoutError) as e:
        timed_out = isinstance(e, TimeoutError)
        code = child.wait()
        child.stdout.close()
        if on_death is not None:
            on_death()
        if timed_out:
            raise CompressError(f"llama.cpp gave no answer within {timeout:.0f} s while {doing}") from None
        if code < 0:
            name = signal.Signals(-code).name
            raise CompressError(f"llama.cpp crashed ({name}) while {doing}: this llama-cpp-python build does not run "
                                "on this CPU; rebuild it as .ci/run does (a portable AVX2 build)") from None
        raise CompressError(f"llama.cpp exited with code {code} while {doing}") from None
    if not reply.get("ok"):
        raise CompressError(f"llama.cpp failed while {doing} ({reply.get('error')})")
    return reply, array


def open_model(path: str | Path, *, embedding: bool = False, n_ctx: int = 512, threads: int = 2) -> LlamaProcess:
    """llama.cpp on ``path`` in a child process (all logits kept, quiet); CompressError when it cannot load."""
    return LlamaProcess(path, embedding=embedding, n_ctx=n_ctx, threads=threads)


def tokenize(llm: LlamaProcess, text: str, add_special: bool = True) -> list[int]:
    """llama.cpp's token ids for ``text``; add_special adds bos/eos/sep as the model's metadata says."""
    return llm.tokenize(text, add_special)


def causal_logits(llm: LlamaProcess, ids: list[int]) -> np.ndarray:
    """Logits float32 [len(ids), vocab] of a causal LM for the token ids, from a fresh context."""
    return llm.causal_logits(ids)


def pooled_embeddings(llm: LlamaProcess, texts: list[str]) -> np.ndarray:
    """Pooled (not normalized) embeddings float32 [len(texts), dim], one text per call."""
    return llm.pooled_embeddings(texts)


def llama_quantize(src: str | Path, dst: str | Path, ftype: str, timeout: float = 900.0) -> None:
    """llama.cpp's own quantizer (llama-quantize) from ``src`` to ``dst``, ``ftype`` a LLAMA_FTYPE_* name.

    Runs in a child process like every other llama.cpp call here.
    """
    child = _start_worker()
    try:
        _call(child, {"op": "quantize", "src": str(src), "dst": str(dst), "ftype": ftype},
              f"quantizing {src} to {ftype}", timeout)
    finally:
        if child.poll() is None:
            _stop_worker(child)


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
