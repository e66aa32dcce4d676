"""Tiny models built from configs (random weights, real architectures) with trained tokenizers.

Widths are chosen to hit edge cases: an intermediate size of 80 is not a multiple of 32 (3-bit
packing pads) nor of 64 (a group size of 64 leaves a shorter last group).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
HIDDEN = 64
INTERMEDIATE = 80
LAYERS = 2
HEADS = 4
POSITIONS = 256

ARCHS = ("llama", "mistral", "qwen2", "gpt2", "opt", "bert")

_TEXT = [
    "Return the number of items in a container, raising TypeError when the object has no length.",
    "The quick brown fox jumps over the lazy dog while the tokenizer learns its merges.",
    "Quantization maps floating point weights onto a small set of integer codes with a scale.",
    "A model folder holds a config, a tokenizer and the weights in safetensors files.",
    "Calibration data is sampled into blocks of tokens so that every run sees the same inputs.",
] * 40


def train_bpe(path: Path, digits: bool = False):
    """A byte-level BPE tokenizer (GPT-2 style) with VOCAB entries, saved to ``path``.

    digits: learn merges of digit runs, then split every digit alone before GPT-2's regex, as SmolLM's
    tokenizer does (the merges stay in the vocabulary, so a reader that ignores the split sees them).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT + (["In 2024 and 2025 we paid 3333 and 1234567 for 42 items."] * 40 if digits else []),
                            trainer)
    if digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return fast


def train_wordpiece(path: Path):
    """A BERT-style WordPiece tokenizer with [CLS] ... [SEP] templates, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # the vocabulary is chosen here, not by tokenizers' WordPieceTrainer, whose choice among tied counts
    # differs from process to process: specials, every character alone and as a continuation, the most
    # frequent words, then two-letter continuations (ties alphabetical), so every run builds the same BERT
    counts: dict[str, int] = {}
    for text in _TEXT:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    vocab += [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][: VOCAB - len(vocab)]
    pieces: dict[str, int] = {}  # then the most frequent two-letter continuations, as a trained vocabulary has
    for word, n in counts.items():
        for i in range(1, len(word) - 1):
            pieces[f"##{word[i:i + 2]}"] = pieces.get(f"##{word[i:i + 2]}", 0) + n
    vocab += [t for t, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0]))][: max(0, VOCAB - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(path))
    return fast


def config_for(arch: str, vocab: int, layers: int = LAYERS):
    import transformers

    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=HEADS)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
        return cls(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_key_value_heads=2,
                   max_position_embeddings=POSITIONS, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                   pad_token_id=0, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=layers, n_head=HEADS, n_inner=INTERMEDIATE,
                                       n_positions=POSITIONS, bos_token_id=0, eos_token_id=0)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN,
                                      max_position_embeddings=POSITIONS, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                      **common)
    if arch == "bert":
        return transformers.BertConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                       max_position_embeddings=POSITIONS, pad_token_id=0, **common)
    raise ValueError(arch)


def build(arch: str, path: Path, kind: str | None = None, layers: int = LAYERS, seed: int = 0) -> Path:
    """Save a tiny ``arch`` model (and its tokenizer) in ``path``; kind picks the head for BERT."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = train_wordpiece(path) if arch == "bert" else train_bpe(path)
    config = config_for(arch, len(tok), layers)
    torch.manual_seed(seed)
    if arch == "bert":
        kind = kind or "masked"
        cls = {"masked": transformers.BertForMaskedLM, "classifier": transformers.BertForSequenceClassification,
               "embedding": transformers.BertModel}[kind]
        if kind == "classifier":
            config.num_labels = 3
            config.id2label = {0: "neg", 1: "neu", 2: "pos"}
            config.label2id = {"neg": 0, "neu": 1, "pos": 2}
        model = cls(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    # random init gives near-uniform outputs; scale weights up a little so quantization error is visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(2.0)
    model.save_pretrained(str(path))
    return path
