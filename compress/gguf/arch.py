"""Architectures GGUF export knows: their metadata keys and how Hugging Face tensor names map to llama.cpp's.

Two families, one table each, no class per model:

- Llama family (Llama, Mistral: llama.cpp architecture "llama"; Qwen2: "qwen2", with attention
  biases). llama.cpp's "llama" rotary embedding pairs dimension i with i+1 inside each head, while
  transformers pairs i with i + head_dim/2, so q and k rows are permuted for "llama" (Qwen2 uses the
  split-halves layout in llama.cpp too, so its rows stay as they are).
- BERT encoders exported as embedding models ("bert"): non-causal attention, the pooling type from the
  sentence-transformers configuration (modules.json and the Pooling folder), heads dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CompressError
from ..model_config import Expected, read_config_dict, read_json_file

SUPPORTED = "Llama, Mistral, Qwen2 (causal LMs) and BERT (embedding models)"
LLAMA_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

_LLAMA_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_BERT_BLOCK = {
    "attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm",
}
_BERT_TOP = {
    "embeddings.word_embeddings": "token_embd", "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types", "embeddings.LayerNorm": "token_embd_norm",
}
# tensors llama.cpp keeps in float32 whatever the file type (as its converter does)
ALWAYS_F32 = ("position_embd.weight", "token_types.weight")


@dataclass
class Arch:
    """One model's export plan: llama.cpp architecture, metadata, tensor names and their transforms."""

    name: str  # llama.cpp architecture: llama, qwen2 or bert
    config: dict
    n_layers: int
    tensor_names: Callable[[str], str | None]  # HF name -> GGUF name, None for tensors llama.cpp does not use
    transform: Callable[[str, np.ndarray], np.ndarray]  # applied to each tensor under its GGUF name
    write_metadata: Callable[[object], None]  # adds the {arch}.* keys to a gguf.GGUFWriter
    shapes: dict[str, Expected]  # GGUF name -> the tensor config.json implies (torch order)
    tied_output: bool = False


def read_config(folder: Path) -> dict:
    """config.json, checked as for every command (compress.model_config)."""
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder} has no config.json; pass a Hugging Face model folder")
    return read_config_dict(folder)


def detect(folder: Path) -> Arch:
    """The :class:`Arch` for the model in ``folder``; a CompressError naming what is supported otherwise."""
    config = read_config(folder)
    model_type = config.get("model_type")
    if isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "?")
        raise CompressError(f"{folder} holds a {method}-quantized checkpoint; plain GGUF export needs the "
                            f"floating-point model")
    if model_type in LLAMA_TYPES:
        return _llama(config, LLAMA_TYPES[model_type])
    if model_type == "bert":
        return _bert(config, folder)
    raise CompressError(f"GGUF export does not support model type '{model_type}'; supported: {SUPPORTED}")


def _require(config: dict, *keys: str) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise CompressError(f"config.json lacks {', '.join(missing)}, which GGUF export needs")


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise CompressError(f"RoPE scaling '{kind}' is not supported by GGUF export; only plain RoPE is")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows [n_head*head_dim, ...] from split halves to interleaved pairs within each head."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _llama(config: dict, arch: str) -> Arch:
    _require(config, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    if config.get("hidden_act", "silu") != "silu":
        raise CompressError(f"hidden_act '{config['hidden_act']}' is not supported for {arch}; llama.cpp expects silu")
    n_layers = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    theta = _rope_theta(config)
    block = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    tied = bool(config.get("tie_word_embeddings", False))

    def names(hf: str) -> str | None:
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": None if tied else "output.weight"}
        if hf in top:
            return top[hf]
        m = block.match(hf)
        if m and m.group(2) in _LLAMA_BLOCK:
            return f"blk.{m.group(1)}.{_LLAMA_BLOCK[m.group(2)]}.{m.group(3)}"
        if hf.endswith("rotary_emb.inv_freq"):
            return None
        raise CompressError(f"tensor {hf} has no place in llama.cpp's {arch} graph; the checkpoint is not a plain "
                            f"{config.get('model_type')} model")

    def transform(name: str, data: np.ndarray) -> np.ndarray:
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            return permute_rotary(data, n_head if ".attn_q." in name else n_kv)
        return data

    def metadata(w) -> None:
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(config["hidden_size"])
        w.add_block_count(n_layers)
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(theta)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(config["vocab_size"])
        if head_dim != config["hidden_size"] // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)

    return Arch(arch, config, n_layers, names, transform, metadata, _llama_shapes(config, arch, n_head, n_kv, head_dim),
                tied_output=tied)


def _llama_shapes(config: dict, arch: str, n_head: int, n_kv: int, head_dim: int) -> dict[str, Expected]:
    """The tensors of a Llama-family checkpoint by GGUF name; biases are optional except Qwen2's q, k, v."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = n_head * head_dim, n_kv * head_dim
    shapes = {"token_embd.weight": Expected((v, h)), "output_norm.weight": Expected((h,))}
    if not config.get("tie_word_embeddings", False):
        shapes["output.weight"] = Expected((v, h))
    block = {"attn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_k.weight": (kv, h), "attn_v.weight": (kv, h),
             "attn_output.weight": (h, q), "ffn_norm.weight": (h,), "ffn_gate.weight": (f, h), "ffn_up.weight": (f, h),
             "ffn_down.weight": (h, f)}
    biases = {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,), "attn_output.bias": (h,),
              "ffn_gate.bias": (f,), "ffn_up.bias": (f,), "ffn_down.bias": (h,)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{name}": Expected(shape) for name, shape in block.items()})
        shapes.update({f"blk.{i}.{name}": Expected(shape, required=arch == "qwen2" and name[5] in "qkv")
                       for name, shape in biases.items()})
    return shapes


def pooling_type(folder: Path) -> int:
    """llama.cpp pooling type (1 mean, 2 CLS, 3 last token) from sentence-transformers files; mean if absent."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return 1
    try:
        entries = read_json_file(modules, "sentence-transformers module list")
        pool = next((m for m in entries if str(m.get("type", "")).endswith("Pooling")), None)
        if pool is None:
            return 1
        cfg = read_json_file(folder / pool["path"] / "config.json", "pooling config")
        cfg.get("pooling_mode")
    except (KeyError, TypeError, AttributeError) as e:
        raise CompressError(f"the sentence-transformers pooling configuration in {folder} is malformed ({e!r})") from None
    if cfg.get("pooling_mode_mean_tokens") or cfg.get("pooling_mode") == "mean":
        return 1
    if cfg.get("pooling_mode_cls_token") or cfg.get("pooling_mode") == "cls":
        return 2
    if cfg.get("pooling_mode_lasttoken") or cfg.get("pooling_mode") == "lasttoken":
        return 3
    raise CompressError(f"pooling mode {cfg} has no llama.cpp equivalent; supported: mean, cls, last token")


def _bert(config: dict, folder: Path) -> Arch:
    _require(config, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CompressError(f"hidden_act '{config['hidden_act']}' is not supported for bert; llama.cpp expects gelu")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CompressError("only absolute position embeddings are supported for bert")
    pooling = pooling_type(folder)
    block = re.compile(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
    suffix = {"gamma": "weight", "beta": "bias"}

    def names(hf: str) -> str | None:
        m = block.match(hf)
        if m:
            if m.group(2) not in _BERT_BLOCK:
                raise CompressError(f"tensor {hf} has no place in llama.cpp's bert graph")
            return f"blk.{m.group(1)}.{_BERT_BLOCK[m.group(2)]}.{suffix.get(m.group(3), m.group(3))}"
        base, _, leaf = hf.removeprefix("bert.").rpartition(".")
        if base in _BERT_TOP:
            return f"{_BERT_TOP[base]}.{suffix.get(leaf, leaf)}"
        # heads and the pooler: an embedding model uses the encoder's hidden states only
        if hf.startswith(("cls.", "pooler.", "bert.pooler.", "classifier.")) or hf.endswith("position_ids"):
            return None
        raise CompressError(f"tensor {hf} has no place in llama.cpp's bert graph; the checkpoint is not a plain BERT")

    def metadata(w) -> None:
        w.add_context_length(int(config.get("max_position_embeddings", 512)))
        w.add_embedding_length(config["hidden_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(config["num_attention_heads"])
        w.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
        w.add_causal_attention(False)
        import gguf

        w.add_pooling_type(gguf.PoolingType(pooling))
        w.add_token_type_count(int(config.get("type_vocab_size", 2)))

    return Arch("bert", config, config["num_hidden_layers"], names, lambda name, data: data, metadata, _bert_shapes(config))


def _bert_shapes(config: dict) -> dict[str, Expected]:
    """The tensors of a BERT encoder by GGUF name (heads and pooler are not exported)."""
    h, f = config["hidden_size"], config["intermediate_size"]
    top = {"token_embd": (config.get("vocab_size", 30522), h), "position_embd": (config.get("max_position_embeddings", 512), h),
           "token_types": (config.get("type_vocab_size", 2), h)}
    shapes = {f"{name}.weight": Expected(shape) for name, shape in top.items()}
    shapes.update({"token_embd_norm.weight": Expected((h,)), "token_embd_norm.bias": Expected((h,))})
    block = {"attn_q": (h, h), "attn_k": (h, h), "attn_v": (h, h), "attn_output": (h, h), "attn_output_norm": None,
             "ffn_up": (f, h), "ffn_down": (h, f), "layer_output_norm": None}
    for i in range(config["num_hidden_layers"]):
        for name, shape in block.items():
            rows = shape[0] if shape else h
            shapes[f"blk.{i}.{name}.weight"] = Expected(shape or (h,))
            shapes[f"blk.{i}.{name}.bias"] = Expected((rows,))
    return shapes
