"""Quantization-aware training: fake-quant layers, training hooks, and convert == fake quant."""

import json

import pytest
import torch
from torch import nn

import compress
from compress.errors import CompressError
from compress.models import load
from compress.qat import QATCallback, convert, freeze_ranges, prepare, set_fake_quant
from compress.qat.config import QATConfig
from compress.qat.core import fake_layers
from compress.qat.fake import FakeQuantLinear


def _ids(n=4, length=24, vocab=300, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=3, lr=1e-3, seed=0, same_batch=False):
    """A plain torch loop: nothing QAT-specific is needed once the model is prepared."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids = _ids(seed=seed if same_batch else seed + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


CONFIGS = [
    QATConfig(bits=4, group_size=32),
    QATConfig(bits=3, group_size=32, sym=True, learnable_scales=True),
    QATConfig(bits=8, group_size=-1, sym=True),
    QATConfig(bits=2, group_size=64),
    QATConfig(method="nf4", blocksize=64),
    QATConfig(method="nf4", blocksize=128, double_quant=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_converted_model_equals_fake_quant(config, tiny_model, tmp_path):
    """After training, the packed checkpoint loaded by compress.load computes what the fake-quant model did."""
    src = tiny_model("llama")
    model = prepare(load(src).model, config)
    _train(model)
    model.eval()
    ids = _ids(seed=9)
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    out = convert(model, tmp_path / "q", source=src)
    loaded = compress.load(out)
    assert loaded.quantization["quant_method"] == ("gptq" if config.method == "int" else "bitsandbytes")
    with torch.no_grad():
        real = loaded.model(input_ids=ids).logits
    # identical weights; only the order of floating-point sums may differ in the 4-bit CPU kernel
    assert (fake - real).abs().max() <= 1e-5 * fake.abs().max()
    if config.method == "int":
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert (cfg["bits"], cfg["group_size"], cfg["sym"]) == (config.bits, config.group_size, config.sym)
    assert (out / "tokenizer.json").is_file()


def test_converted_bert_embedding_model_equals_fake_quant(tiny_model, tmp_path):
    src = tiny_model("bert", "embedding")
    base = load(src)
    model = prepare(base.model, QATConfig(bits=4, group_size=32))
    model.eval()
    enc = base.tokenizer(["the quick fox", "integer codes and scales"], return_tensors="pt", padding=True)
    with torch.no_grad():
        fake = model(**enc).last_hidden_state
    loaded = compress.load(convert(model, tmp_path / "e", source=src))
    assert loaded.kind == "embedding"
    with torch.no_grad():
        real = loaded.model(**enc).last_hidden_state
    assert (fake - real).abs().max() <= 1e-5 * fake.abs().max()


def test_prepare_swaps_only_block_linears(tiny_model):
    model = load(tiny_model("llama")).model
    head, embed = model.lm_head, model.model.embed_tokens
    prepare(model, QATConfig(skip=[r"mlp\.down_proj"]))
    layers = fake_layers(model)
    assert len(layers) == 2 * 6 and not any("down_proj" in n for n in layers)
    assert model.lm_head is head and model.model.embed_tokens is embed
    with pytest.raises(CompressError, match="already prepared"):
        prepare(model, QATConfig())


def test_untied_head_on_request_and_tied_head_refused(tiny_model):
    import transformers

    import tiny

    config = tiny.config_for("qwen2", 320)
    config.tie_word_embeddings = True
    tied = transformers.Qwen2ForCausalLM(config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(CompressError, match="tied"):
        prepare(tied, QATConfig(quantize_head=True))
    untied = load(tiny_model("llama")).model
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    prepare(untied, QATConfig(quantize_head=True, group_size=32))
    assert isinstance(untied.lm_head, FakeQuantLinear)


def test_straight_through_gradients_and_freezing():
    torch.manual_seed(0)
    layer = FakeQuantLinear.from_linear(nn.Linear(64, 8), QATConfig(bits=3, group_size=32, learnable_scales=True))
    x = torch.randn(5, 64)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0
    plain = FakeQuantLinear.from_linear(nn.Linear(64, 8), QATConfig(bits=3, group_size=32))
    before = plain.scales.clone()
    with torch.no_grad():
        plain.weight.mul_(2)
    plain(x)
    assert torch.allclose(plain.scales, 2 * before, rtol=1e-2)  # ranges follow the weights...
    plain.freeze()
    with torch.no_grad():
        plain.weight.mul_(2)
    plain(x)
    assert torch.allclose(plain.scales, 2 * before, rtol=1e-2)  # ...until frozen
    set_fake_quant(plain, False)
    assert torch.equal(plain(x), nn.functional.linear(x, plain.weight, plain.bias))


def test_training_lowers_the_quantized_loss(tiny_model):
    """2-bit fake quantization hurts; training through it recovers part of the loss."""
    model = prepare(load(tiny_model("llama")).model, QATConfig(bits=2, group_size=32))
    losses = _train(model, steps=12, lr=3e-3, same_batch=True)
    assert sum(losses[-3:]) / 3 < losses[0]


def test_activation_fake_quant_only_changes_inputs(tiny_model, tmp_path):
    """W4A8: the converted checkpoint holds the same weights; activations run in floating point after."""
    src = tiny_model("llama")
    model = prepare(load(src).model, QATConfig(bits=4, group_size=32, act_bits=8)).eval()
    ids = _ids(seed=3)
    with torch.no_grad():
        with_a8 = model(input_ids=ids).logits
        for layer in fake_layers(model).values():
            layer.act = None
        weights_only = model(input_ids=ids).logits
        real = compress.load(convert(model, tmp_path / "a8", source=src)).model(input_ids=ids).logits
    assert (weights_only - real).abs().max() <= 1e-5 * real.abs().max()
    assert 0 < (with_a8 - weights_only).abs().max() < 0.1 * real.abs().max()


def test_callback_warmup_and_freeze_in_the_trainer(tiny_model, tmp_path):
    """With the Hugging Face Trainer (through the distillation trainer), fake quantization starts after
    warm-up and the ranges freeze at the requested fraction of the steps."""
    from compress.config import DistillConfig
    from compress.distill import distill, lm_data

    loaded = load(tiny_model("llama"))
    config = QATConfig(bits=4, group_size=32, warmup_steps=2, freeze_at=0.5)
    model = prepare(loaded.model, config)
    set_fake_quant(model, True)
    train = DistillConfig(task="causal", alpha=0.0, steps=6, batch_size=4, max_length=32, evaluate=False,
                          learning_rate=1e-3, save_steps=100, logging_steps=100)
    data = lm_data("causal", loaded.tokenizer, "builtin", 32, max_samples=64)
    callback = QATCallback(config)
    distill(None, model, data, train, output_dir=tmp_path / "ck", tokenizer=loaded.tokenizer, callbacks=[callback],
            device="cpu", progress=False)
    assert callback.enabled_at == 2 and callback.frozen_at == 3
    assert all(layer.enabled and layer.frozen for layer in fake_layers(model).values())


def test_config_and_convert_refusals(tiny_model, tmp_path):
    with pytest.raises(CompressError, match="NF4 is a 4-bit format"):
        QATConfig(method="nf4", bits=3)
    with pytest.raises(CompressError, match="learnable scales apply to --method int"):
        QATConfig(method="nf4", learnable_scales=True)
    with pytest.raises(CompressError, match="--bits 5"):
        QATConfig(bits=5)
    with pytest.raises(CompressError, match="8 bits"):
        QATConfig(act_bits=4)
    with pytest.raises(CompressError, match="call compress.qat.prepare"):
        convert(load(tiny_model("llama")).model, tmp_path / "x")
    with pytest.raises(CompressError, match="no Linear layer is left"):
        prepare(load(tiny_model("llama")).model, QATConfig(skip=["."]))
    freeze_ranges(nn.Linear(2, 2))  # nothing to freeze is not an error
    assert not (tmp_path / "x").exists()


def test_gptq_layout_feeds_the_gguf_export(tiny_model, tmp_path):
    """A symmetric 4-bit g32 QAT result is carried into Q4_0 blocks like a GPTQ checkpoint."""
    pytest.importorskip("gguf", reason="the gguf package is needed for GGUF export")
    from compress.gguf.calibrated import gptq_blocks

    src = tiny_model("llama")
    # the tiny Llama's down_proj has 80 inputs, which do not split into blocks of 32: kept in float
    model = prepare(load(src).model, QATConfig(bits=4, group_size=32, sym=True, skip=["down_proj"]))
    out = convert(model, tmp_path / "q", source=src)
    blocks = gptq_blocks(src, out, "q4_0")
    assert len(blocks) == 2 * 6 and all(t == "Q4_0" for t, _ in blocks.values())
