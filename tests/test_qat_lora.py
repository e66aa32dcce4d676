"""Adapter recovery on quantized bases: attaching, training, saving, reloading, merging, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

import compress
from compress.config import NF4Config, RTNConfig
from compress.errors import CompressError
from compress.qat import LoraRecoveryConfig, attach_lora, merge_adapters, recover_model
from compress.qat.lora import load_with_adapters

pytest.importorskip("peft")

FAST = dict(rank=4, alpha=8.0, max_length=32, batch_size=4, max_samples=64, logging_steps=5)


@pytest.fixture(scope="module")
def bases(tiny_model, tmp_path_factory):
    """float, int4 (RTN g32) and NF4 folders of one tiny Llama, plus a small text file to train on."""
    import tiny

    root = tmp_path_factory.mktemp("lora-bases")
    float_dir = tiny_model("llama")
    compress.quantize(float_dir, root / "int4", RTNConfig(bits=4, group_size=32), progress=False)
    compress.quantize(float_dir, root / "nf4", NF4Config(blocksize=64), progress=False)
    text = root / "train.txt"
    text.write_text("\n".join(tiny._TEXT) + "\n")
    # two windows of the training text: the distribution the adapters learn on
    tok = compress.load(float_dir).tokenizer
    ids = tok(" ".join(tiny._TEXT[:5]), return_tensors="pt").input_ids[:, :64].reshape(2, 32)
    return {"float": float_dir, "int4": root / "int4", "nf4": root / "nf4", "text": text, "ids": ids}


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _kl(teacher_logits, logits) -> float:
    """Mean per-token KL(teacher || model), nats."""
    t = torch.log_softmax(teacher_logits, -1)
    return float((t.exp() * (t - torch.log_softmax(logits, -1))).sum(-1).mean())


def test_adapters_attach_only_to_quantized_layers(bases):
    from compress.qat.lora_layer import QuantLoraLayer
    from compress.quant.linear import QuantLinear

    loaded = compress.load(bases["int4"])
    ids = bases["ids"]
    before = _logits(loaded.model, ids)
    quantized = {n for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    model = attach_lora(loaded, LoraRecoveryConfig(**FAST))
    plain = model.get_base_model()
    wrapped = {n for n, m in plain.named_modules() if isinstance(m, QuantLoraLayer)}
    assert wrapped == quantized and len(wrapped) == 14
    assert not isinstance(plain.lm_head, QuantLoraLayer)  # the float head gets no adapter
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    assert torch.equal(_logits(model, ids), before)  # B starts at zero: the base's outputs, exactly

    narrow = attach_lora(compress.load(bases["nf4"]), LoraRecoveryConfig(target_modules=["q_proj$", "v_proj$"], **FAST))
    names = {n for n, m in narrow.get_base_model().named_modules() if isinstance(m, QuantLoraLayer)}
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)


@pytest.mark.parametrize("base", ["int4", "nf4"])
def test_training_moves_toward_the_float_model_and_reloads(bases, tmp_path, base):
    ids = bases["ids"]
    teacher = _logits(compress.load(bases["float"]).model, ids)
    kl_before = _kl(teacher, _logits(compress.load(bases[base]).model, ids))
    config = LoraRecoveryConfig(steps=25, learning_rate=3e-3, distill=True, temperature=1.0, **FAST)
    report = recover_model(bases[base], tmp_path / "ad", config, data=str(bases["text"]), teacher=bases["float"],
                           progress=False)
    assert report.layers == 14 and not report.merged
    trained = _logits(report.model, ids)
    assert _kl(teacher, trained) < 0.7 * kl_before
    # the saved adapters rebuild the same model
    files = {p.name for p in (tmp_path / "ad").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recovery.json"} <= files
    info = json.loads((tmp_path / "ad" / "recovery.json").read_text())
    assert info["base"] == str(bases[base]) and info["teacher"] == str(bases["float"])
    reloaded = load_with_adapters(tmp_path / "ad")
    assert reloaded.quantization and reloaded.kind == "causal"
    assert torch.equal(_logits(reloaded.model, ids), trained)


@pytest.mark.parametrize("base", ["int4", "nf4"])
def test_merged_requantized_checkpoint_matches_base_plus_adapters(bases, tmp_path, base):
    from compress.quant.linear import QuantModule

    config = LoraRecoveryConfig(steps=12, learning_rate=2e-2, **FAST)
    report = recover_model(bases[base], tmp_path / "ad", config, data=str(bases["text"]), progress=False)
    used = merge_adapters(tmp_path / "ad", tmp_path / "merged", progress=False)
    merged = compress.load(tmp_path / "merged")
    original = compress.load(bases[base])
    # the same format and settings, layer for layer
    assert merged.quantization["quant_method"] == original.quantization["quant_method"]
    kinds = lambda m: {n: (type(x).__name__, getattr(x, "bits", None), getattr(x, "group_size", None),
                           getattr(x, "blocksize", None)) for n, x in m.named_modules() if isinstance(x, QuantModule)}
    assert kinds(merged.model) == kinds(original.model)
    assert used["method"] == ("nf4" if base == "nf4" else "gptq")
    ids = bases["ids"]
    adapted = _logits(report.model, ids)
    base_out = _logits(original.model, ids)
    float_out = _logits(compress.load(bases["float"]).model, ids)
    delta = (adapted - base_out).abs().max()
    assert delta > 1e-3  # the adapters changed something worth merging
    # merged + re-quantized agrees with base + adapters within one quantization error of the base
    quant_error = (base_out - float_out).abs().max()
    assert (_logits(merged.model, ids) - adapted).abs().max() < 1.5 * quant_error
    assert json.loads((tmp_path / "merged" / "adapter_recovery.json").read_text())["requantized"]["method"] == used["method"]


def test_recover_with_merge_writes_a_quantized_folder(tiny_model, tmp_path):
    """GPT-2 stores its projections as Conv1D: the merged float model keeps that layout."""
    src = tiny_model("gpt2")
    compress.quantize(src, tmp_path / "q", RTNConfig(bits=4, group_size=32), progress=False)
    report = recover_model(tmp_path / "q", tmp_path / "m", LoraRecoveryConfig(steps=3, **FAST), merge=True,
                           requantize="rtn", progress=False)
    assert report.merged and report.model is None and report.requantized["bits"] == 4
    assert report.requantized["method"] == "rtn"
    merged = compress.load(tmp_path / "m")
    assert merged.quantization["bits"] == 4 and merged.quantization["group_size"] == 32
    assert torch.isfinite(_logits(merged.model, torch.randint(1, 300, (2, 16)))).all()


def _one_sentence(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message and len(message) < 300
    return message


def test_bad_inputs(bases, tmp_path, hash_tree):
    before = hash_tree(bases["int4"])
    cfg = LoraRecoveryConfig(steps=2, **FAST)
    with pytest.raises(CompressError) as e:  # adapters on a base that is not quantized
        recover_model(bases["float"], tmp_path / "o", cfg, progress=False)
    assert "not quantized" in _one_sentence(e)
    with pytest.raises(CompressError) as e:
        attach_lora(compress.load(bases["float"]), cfg)
    assert "not quantized" in _one_sentence(e)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CompressError) as e:
        recover_model(bases["int4"], tmp_path / "o", cfg, data=str(empty), progress=False)
    assert "empty.txt" in _one_sentence(e)
    with pytest.raises(CompressError) as e:
        recover_model(bases["int4"], tmp_path / "o", cfg, data=str(tmp_path / "missing.txt"), progress=False)
    assert "does not exist" in _one_sentence(e)
    with pytest.raises(CompressError) as e:
        recover_model(bases["int4"], tmp_path / "o", LoraRecoveryConfig(distill=True, **FAST), progress=False)
    assert "teacher" in _one_sentence(e)
    with pytest.raises(CompressError) as e:
        recover_model(bases["int4"], tmp_path / "o", cfg, teacher=bases["float"], progress=False)
    assert "distill" in _one_sentence(e)
    with pytest.raises(CompressError) as e:  # a transfer set is for classifiers
        recover_model(bases["int4"], tmp_path / "o", LoraRecoveryConfig(distill=True, **FAST), teacher=bases["float"],
                      transfer=str(bases["text"]), progress=False)
    assert "transfer set" in _one_sentence(e)
    with pytest.raises(CompressError) as e:
        recover_model(bases["int4"], tmp_path / "o", cfg, merge=True, requantize="q5", progress=False)
    _one_sentence(e)
    with pytest.raises(CompressError) as e:
        attach_lora(compress.load(bases["int4"]), LoraRecoveryConfig(target_modules=["nothing_here"], **FAST))
    assert "no quantized layer matches" in _one_sentence(e)
    with pytest.raises(CompressError) as e:
        load_with_adapters(tmp_path)
    _one_sentence(e)
    for bad in (dict(rank=0), dict(dropout=1.0), dict(kd_weight=2.0), dict(steps=0), dict(target_modules=["("]),
                dict(max_length=2)):
        with pytest.raises(CompressError) as e:
            LoraRecoveryConfig(**bad)
        _one_sentence(e)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    assert hash_tree(bases["int4"]) == before


def test_adapters_refuse_another_base(bases, tmp_path):
    recover_model(bases["int4"], tmp_path / "ad", LoraRecoveryConfig(steps=1, **FAST), data=str(bases["text"]),
                  progress=False)
    with pytest.raises(CompressError) as e:
        load_with_adapters(tmp_path / "ad", base=bases["nf4"])
    assert "not the quantized base" in _one_sentence(e)
    with pytest.raises(CompressError) as e:
        recover_model(bases["int4"], tmp_path / "ad", LoraRecoveryConfig(steps=1, **FAST), progress=False)
    assert "already exists" in _one_sentence(e)


def _trained_classifier(source, rows, out):
    """The tiny classifier trained a few dozen steps on ``rows``, so its predictions are far from uniform."""
    loaded = compress.load(source)
    model, tok = loaded.model.train(), loaded.tokenizer
    texts = [r.rsplit(",", 1)[0] for r in rows[1:]]
    labels = torch.tensor([model.config.label2id[r.rsplit(",", 1)[1]] for r in rows[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for step in range(20):
        idx = torch.randint(0, len(texts), (16,))
        batch = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        model(**batch, labels=labels[idx]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Mean KL(teacher || student) of class distributions: what distillation minimises (a raw logit
    difference also counts shifts that softmax ignores)."""
    return float(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


def test_classifier_adapters_learn_the_float_predictions_and_evaluate(tiny_model, tmp_path):
    """A 2-bit classifier: adapters distilled on labeled text move its logits toward the float model's, the
    float head stays frozen, and the harness reads the adapter folder as base plus adapters."""
    from compress.config import EvalConfig
    from compress.eval.harness import compare

    words = ["quick fox", "model folder", "weights scale", "tokenizer merges", "calibration data", "integer codes"]
    rows = ["text,label"] + [f"{words[i % 6]} {words[(i * 5) % 6]} number {i},{['neg', 'neu', 'pos'][i % 3]}"
                             for i in range(96)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    float_dir = _trained_classifier(tiny_model("bert", "classifier"), rows, tmp_path / "float")
    compress.quantize(float_dir, tmp_path / "w3", RTNConfig(bits=2, group_size=32), progress=False)
    tok = compress.load(float_dir).tokenizer
    batch = tok([r.split(",")[0] for r in rows[1:17]], padding=True, return_tensors="pt")
    teacher = compress.load(float_dir).model(**batch).logits.detach()
    err_before = _kl(teacher, compress.load(tmp_path / "w3").model(**batch).logits.detach())
    config = LoraRecoveryConfig(steps=30, learning_rate=3e-3, distill=True, temperature=1.0, **FAST)
    (tmp_path / "transfer.txt").write_text("\n".join(f"{w} unlabeled {i}" for i, w in enumerate(words * 4)) + "\n")
    report = recover_model(tmp_path / "w3", tmp_path / "ad", config, data=str(tmp_path / "train.csv"), teacher=float_dir,
                           transfer=str(tmp_path / "transfer.txt"), progress=False)
    assert report.layers == 12  # 2 blocks x (query, key, value, attention output, intermediate, output)
    assert json.loads((tmp_path / "ad" / "recovery.json").read_text())["transfer"] == str(tmp_path / "transfer.txt")
    assert report.task == "classify" and "distilled" in report.summary()
    assert not any(p.requires_grad for n, p in report.model.named_parameters() if "classifier" in n)
    err_after = _kl(teacher, report.model(**batch).logits.detach())
    assert err_after < 0.7 * err_before
    result = compare([float_dir, tmp_path / "w3", tmp_path / "ad"], EvalConfig(device="cpu", latency=False, samples=16,
                                                                               labeled=str(tmp_path / "train.csv")),
                     progress=False)
    ad = result.results[2]
    assert ad.name == "ad" and ad.quantization == "rtn w2 g32 +lora r4"
    assert ad.weights_bytes > result.results[1].weights_bytes
    assert ad.bits_per_weight > result.results[1].bits_per_weight
    assert 0 <= ad.metrics["accuracy"] <= 1 and "kl" in ad.metrics


def test_embedding_bases_are_refused(tiny_model, tmp_path):
    compress.quantize(tiny_model("bert", "embedding"), tmp_path / "emb", RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(CompressError) as e:
        recover_model(tmp_path / "emb", tmp_path / "o", LoraRecoveryConfig(steps=1, **FAST), progress=False)
    assert "embedding model" in _one_sentence(e)
    assert not (tmp_path / "o").exists()
