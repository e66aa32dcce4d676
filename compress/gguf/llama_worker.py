"""llama.cpp in a child process: ``python -m compress.gguf.llama_worker`` serves one model over a pipe.

llama.cpp is native code: a build that does not suit the CPU dies with SIGSEGV or SIGILL, and in-process
that kills the caller (a test run, a benchmark, the CLI) with it. :class:`compress.gguf.verify.LlamaProcess`
runs this module instead and turns the child's death into one CompressError.

The protocol is framed JSON, no pickle: each message is an 8-byte little-endian length and a JSON
object; a reply that carries an array is followed by a second frame of its raw float32 bytes, whose
shape the JSON gives. Requests: ``{"op": "open", "path", "embedding", "n_ctx", "threads"}``, then
``tokenize`` (text, add_special, parse_special), ``logits`` (ids), ``embed`` (texts), ``chat`` (messages,
max_tokens: a greedy answer through llama-cpp-python's chat API), ``quantize`` (src, dst, ftype:
llama.cpp's LLAMA_FTYPE_* name) and ``close``. Replies: ``{"ok": true, ...}`` or ``{"ok": false,
"error": sentence}``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import BinaryIO

import numpy as np


def send(stream: BinaryIO, message: dict, array: np.ndarray | None = None) -> None:
    """Write one JSON frame (and the raw float32 bytes of ``array`` as a second frame)."""
    if array is not None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        message = {**message, "shape": list(array.shape)}
    body = json.dumps(message).encode()
    stream.write(struct.pack("<Q", len(body)) + body)
    if array is not None:
        raw = array.tobytes()
        stream.write(struct.pack("<Q", len(raw)) + raw)
    stream.flush()


def _read_frame(stream: BinaryIO) -> bytes:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the other side closed the pipe")
    (n,) = struct.unpack("<Q", head)
    body = stream.read(n)
    if len(body) < n:
        raise EOFError("the other side closed the pipe mid-message")
    return body


def receive(stream: BinaryIO) -> tuple[dict, np.ndarray | None]:
    """Read one message, and its array when the JSON names a shape."""
    message = json.loads(_read_frame(stream))
    if "shape" not in message:
        return message, None
    return message, np.frombuffer(_read_frame(stream), dtype=np.float32).reshape(message["shape"])


def _quantize(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer (llama-quantize) on a GGUF file."""
    import ctypes

    import llama_cpp

    if not ftype.startswith("LLAMA_FTYPE_") or not hasattr(llama_cpp, ftype):
        raise ValueError(f"llama.cpp has no file type {ftype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise ValueError(f"llama.cpp could not quantize {src} to {ftype}")


def _chat(llm, messages: list[dict], max_tokens: int) -> dict:
    """A greedy answer as llama-cpp-python's chat API gives it, with the chat format it chose and the prompt
    that format renders (the GGUF's tokenizer.chat_template when the file has one, else llama-2's)."""
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template")
    if llm.chat_format == "chat_template.default" and template is not None:
        eos, bos = llm.token_eos(), llm.token_bos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template, llm._model.token_get_text(eos) if eos != -1 else "",
            llm._model.token_get_text(bos) if bos != -1 else "")
        prompt = formatter(messages=messages).prompt
    elif llm.chat_format == "llama-2":  # llama-cpp-python's fallback for a file without a template
        prompt = llama_chat_format.format_llama2(messages=messages).prompt
    else:
        prompt = None
    llm.reset()
    answer = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
    return {"format": llm.chat_format, "prompt": prompt, "text": answer["choices"][0]["message"]["content"]}


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer requests until ``close`` or end of input; errors go back as sentences, not tracebacks."""
    llm = None
    while True:
        try:
            request, _ = receive(requests)
        except EOFError:
            return
        op = request.get("op")
        try:
            if op == "close":
                send(replies, {"ok": True})
                return
            if op == "quantize":
                _quantize(request["src"], request["dst"], request["ftype"])
                send(replies, {"ok": True})
            elif op == "open":
                import llama_cpp

                n_ctx = int(request["n_ctx"])
                llm = llama_cpp.Llama(model_path=request["path"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                      logits_all=not request["embedding"], embedding=request["embedding"],
                                      n_threads=request["threads"], n_threads_batch=request["threads"],
                                      verbose=False, seed=0)
                send(replies, {"ok": True})
            elif llm is None:
                send(replies, {"ok": False, "error": f"no model is open for {op}"})
            elif op == "tokenize":
                ids = llm.tokenize(request["text"].encode("utf-8"), add_bos=request["add_special"],
                                   special=bool(request.get("parse_special", False)))
                send(replies, {"ok": True, "ids": list(ids)})
            elif op == "chat":
                send(replies, {"ok": True, **_chat(llm, request["messages"], int(request["max_tokens"]))})
            elif op == "logits":
                ids = request["ids"]
                llm.reset()
                llm.eval(list(ids))
                send(replies, {"ok": True}, np.array(llm.scores[: len(ids)], dtype=np.float32))
            elif op == "embed":
                rows = [llm.embed(t, normalize=False) for t in request["texts"]]
                send(replies, {"ok": True}, np.array(rows, dtype=np.float32))
            else:
                send(replies, {"ok": False, "error": f"unknown request {op!r}"})
        except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
            send(replies, {"ok": False, "error": str(e) or type(e).__name__})


def main() -> None:
    # the protocol gets a private copy of stdout; fd 1 then points at stderr, so whatever llama.cpp's C
    # code prints cannot corrupt a frame
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
