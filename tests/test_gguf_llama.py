"""Exported GGUF files in the real consumer, llama.cpp (llama-cpp-python), against transformers.

Tolerances (float32 reference computed by transformers on the same token ids):
- f32: max |logit difference| < 1e-3 of the logit range; f16/bf16: < 2e-2 of it (rounding of weights);
- quantized causal LMs: mean per-token KL(transformers || llama.cpp) below a per-type bound;
- embeddings (MiniLM): cosine >= 0.9999 for f32/f16, >= 0.999 for q8_0, >= 0.97 for 4-bit types.
"""

import importlib.util
import os
import signal

import numpy as np
import pytest

# llama.cpp is only ever loaded in child processes (verify.LlamaProcess): a native crash fails one test
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (pip install 'compress[llama]')", allow_module_level=True)

import tiny  # noqa: E402
from compress.gguf import verify  # noqa: E402
from compress.gguf.writer import TYPES, export_gguf  # noqa: E402

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "numbers 3 33 333 3333 and 3.14159, 1e-5",
    "I've been told he's there; we'll see, they'd say, you're sure?",
    "naïve café, Ünïcödé, 日本語のテキスト, emoji 🚀🦙",
    "quantization maps floating point weights onto integer codes",
]
# KL bounds (nats per token) on the 256-wide tiny Llama, whose random weights are harsher than trained ones
KL_BOUND = {"q8_0": 1e-3, "q6_k": 5e-3, "q5_0": 2e-2, "q5_1": 2e-2, "q5_k": 2e-2, "q5_k_m": 2e-2,
            "q4_0": 6e-2, "q4_1": 6e-2, "q4_k": 6e-2, "q4_k_m": 6e-2}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A 2-layer Llama whose rows (256, 512) fill k-quant super-blocks, so every type is really used."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("wide") / "llama"
    path.mkdir()
    tok = tiny.train_bpe(path)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(2.0)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def wide_reference(wide_llama):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(wide_llama))(" ".join(SAMPLES[:6]))["input_ids"][:96]
    return ids, verify.transformers_logits(wide_llama, ids)


@pytest.mark.parametrize("export_type", list(TYPES))
def test_causal_logits_every_type(wide_llama, wide_reference, tmp_path, export_type):
    ids, reference = wide_reference
    report = export_gguf(wide_llama, tmp_path / "m.gguf", export_type)
    if export_type in ("q4_k", "q5_k", "q6_k"):  # 14 layers and the embedding; the output matrix at Q6_K, as llama-quantize
        expected = {"Q6_K": 16} if export_type == "q6_k" else {export_type.upper(): 15, "Q6_K": 1}
        assert {t: report.type_counts.get(t) for t in expected} == expected and not report.fallbacks
    logits = verify.causal_logits(verify.open_model(tmp_path / "m.gguf"), ids)
    span = float(reference.max() - reference.min())
    diff = float(np.abs(logits - reference).max())
    if export_type == "f32":
        assert diff < 1e-3 * span, diff
    elif export_type in ("f16", "bf16"):
        assert diff < 2e-2 * span, diff
    else:
        kl = verify.mean_kl(reference, logits)
        assert kl < KL_BOUND[export_type], kl


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_f32(tiny_model, tmp_path, arch):
    from transformers import AutoTokenizer

    src = tiny_model(arch)
    ids = AutoTokenizer.from_pretrained(str(src))(SAMPLES[1] + SAMPLES[3])["input_ids"]
    reference = verify.transformers_logits(src, ids)
    export_gguf(src, tmp_path / "m.gguf", "f32")
    logits = verify.causal_logits(verify.open_model(tmp_path / "m.gguf"), ids)
    assert np.abs(logits - reference).max() < 1e-3 * float(reference.max() - reference.min())


def check_tokenization(model_dir, gguf_path, samples=SAMPLES):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    llm = verify.open_model(gguf_path, embedding=hf.cls_token_id is not None)
    for text in samples:
        assert verify.tokenize(llm, text) == hf(text)["input_ids"], text


def test_tokenization_byte_level_bpe(tiny_model, tmp_path):
    src = tiny_model("llama")
    export_gguf(src, tmp_path / "m.gguf", "q8_0")
    check_tokenization(src, tmp_path / "m.gguf")


def test_tokenization_digits_one_by_one(tiny_model, tmp_path):
    """SmolLM's pre-tokenizer (each digit alone, then GPT-2's regex) is written as llama.cpp's smollm: ids
    agree on numbers although the vocabulary holds digit merges that GPT-2's splitting alone would use."""
    import shutil

    src = tmp_path / "digits"
    shutil.copytree(tiny_model("llama"), src)
    tok = tiny.train_bpe(src, digits=True)
    assert any(len(t.lstrip("\u0120")) > 1 and t.lstrip("\u0120").isdigit() for t in tok.get_vocab())
    export_gguf(src, tmp_path / "m.gguf", "f16")
    check_tokenization(src, tmp_path / "m.gguf", SAMPLES + ["In 2024 and 2025 we paid 3333, 1234567 and 42."])


def test_tokenization_wordpiece_and_embeddings(minilm, tmp_path):
    """MiniLM: WordPiece ids identical, pooled embeddings close for float and quantized types."""
    bounds = {"f32": 0.9999, "f16": 0.9999, "q8_0": 0.999, "q4_k_m": 0.97, "q4_0": 0.95}
    reference = verify.transformers_embeddings(minilm, SAMPLES, pooling=1)
    for export_type, bound in bounds.items():
        path = tmp_path / f"{export_type}.gguf"
        export_gguf(minilm, path, export_type)
        if export_type == "f16":
            check_tokenization(minilm, path)
        got = verify.pooled_embeddings(verify.open_model(path, embedding=True), SAMPLES)
        cos = verify.cosine(reference, got)
        assert cos.min() >= bound, (export_type, cos.min())
        path.unlink()


def test_tokenization_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is needed to train the test tokenizer")
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read SentencePiece models")
    import torch
    import transformers

    raw = tmp_path / "spm"
    raw.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny._TEXT), model_prefix=str(raw / "tokenizer"),
                                   vocab_size=320, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    model_dir = tmp_path / "model"
    tok = transformers.LlamaTokenizer.from_pretrained(str(raw))
    tok.save_pretrained(str(model_dir))
    config = tiny.config_for("llama", len(tok))
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(model_dir))
    export_gguf(model_dir, tmp_path / "m.gguf", "f16")
    # the Hugging Face Metaspace pre-tokenizer adds no U+2581 before text that already starts with a
    # space, while llama.cpp always prepends one: texts with leading spaces differ in that one token
    check_tokenization(model_dir, tmp_path / "m.gguf", [s for s in SAMPLES if not s.startswith(" ")])


def test_kquants_match_llama_quantize(wide_llama, wide_reference, tmp_path):
    """Our Q4_K_M file is as close to the float model as llama.cpp's own llama-quantize result."""
    ids, reference = wide_reference
    export_gguf(wide_llama, tmp_path / "f32.gguf", "f32")
    verify.llama_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    export_gguf(wide_llama, tmp_path / "ours.gguf", "q4_k_m")
    kl = {name: verify.mean_kl(reference, verify.causal_logits(verify.open_model(tmp_path / f"{name}.gguf"), ids))
          for name in ("ours", "theirs")}
    assert kl["ours"] < 1.25 * kl["theirs"], kl
    assert abs((tmp_path / "ours.gguf").stat().st_size - (tmp_path / "theirs.gguf").stat().st_size) < 4096


def test_special_tokens_in_text_and_chat(tiny_model, tmp_path):
    """parse_special reads a special token written in the text as that token, as transformers does; chat
    answers greedily and names the format it used (llama-2's fallback for a file without a template)."""
    from transformers import AutoTokenizer

    src = tiny_model("llama")
    export_gguf(src, tmp_path / "m.gguf", "f16")
    hf = AutoTokenizer.from_pretrained(str(src))
    text = "<|endoftext|>numbers 3 33<|endoftext|>"
    with verify.open_model(tmp_path / "m.gguf") as llm:
        assert llm.tokenize(text, add_special=False, parse_special=True) == hf(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text, add_special=False)[0] != hf.eos_token_id
        answer = llm.chat([{"role": "user", "content": "Hello"}], max_tokens=4)
        again = llm.chat([{"role": "user", "content": "Hello"}], max_tokens=4)
    assert answer["format"] == "llama-2" and "[INST]" in answer["prompt"]
    assert isinstance(answer["text"], str) and answer == again


@pytest.mark.parametrize("hidden", [256, 96])
def test_tied_embedding_types_match_llama_quantize(tmp_path, hidden):
    """With tied embeddings (SmolLM2) the token embedding is also the output matrix: every type gives it the
    tensor type llama-quantize gives it (Q6_K, or Q8_0 for rows that do not fill 256), and every other
    tensor's type agrees too."""
    import gguf
    import torch
    import transformers

    src = tmp_path / "tied"
    src.mkdir()
    tok = tiny.train_bpe(src)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(src))
    export_gguf(src, tmp_path / "f32.gguf", "f32")

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    for export_type, ftype in (("q4_0", "Q4_0"), ("q5_1", "Q5_1"), ("q8_0", "Q8_0"), ("q6_k", "Q6_K"),
                               ("q4_k_m", "Q4_K_M")):
        export_gguf(src, tmp_path / "ours.gguf", export_type, overwrite=True)
        verify.llama_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", f"LLAMA_FTYPE_MOSTLY_{ftype}")
        ours, theirs = types(tmp_path / "ours.gguf"), types(tmp_path / "theirs.gguf")
        assert "output.weight" not in ours and ours == theirs, export_type


def test_native_crash_fails_one_check(tiny_model, tmp_path):
    """llama.cpp dying of a signal ends its child process only: the waiting call raises one sentence."""
    from compress.errors import CompressError

    export_gguf(tiny_model("llama"), tmp_path / "m.gguf", "q8_0")
    with verify.open_model(tmp_path / "m.gguf") as llm:
        assert len(llm.causal_logits([1, 2, 3])) == 3
        os.kill(llm._child.pid, signal.SIGSEGV)
        with pytest.raises(CompressError, match=r"llama.cpp crashed \(SIGSEGV\) while evaluating 2 tokens"):
            llm.causal_logits([1, 2])
        with pytest.raises(CompressError, match="is closed"):
            llm.causal_logits([1, 2])


def test_llama_errors_are_sentences(tmp_path):
    """A file llama.cpp refuses, and a file type it does not know, come back as one CompressError each."""
    from compress.errors import CompressError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(CompressError, match="llama.cpp failed while loading"):
        verify.open_model(bad)
    with pytest.raises(CompressError, match="has no file type LLAMA_FTYPE_NOPE"):
        verify.llama_quantize(bad, tmp_path / "out.gguf", "LLAMA_FTYPE_NOPE")


@pytest.mark.slow
def test_reference_lm_own_tokenizer(tmp_path):
    """The reference LM's own byte-level BPE (llama.cpp's converter refuses it): identical ids, same logits."""
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from compress.data import load_texts

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reference_lm import ensure_reference_lm  # trains it (about 15 minutes) unless cached

    src = ensure_reference_lm()
    export_gguf(src, tmp_path / "m.gguf", "f32")
    texts = SAMPLES + load_texts("builtin", "heldout")[:200]
    check_tokenization(src, tmp_path / "m.gguf", texts)
    ids = AutoTokenizer.from_pretrained(str(src))(" ".join(texts[8:20]))["input_ids"][:256]
    reference = verify.transformers_logits(src, ids)
    logits = verify.causal_logits(verify.open_model(tmp_path / "m.gguf"), ids)
    assert verify.mean_kl(reference, logits) < 1e-5
