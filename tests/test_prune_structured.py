"""Structured pruning: heads and FFN neurons physically removed, configs rewritten, stock reload exact."""

import pytest
import torch

from compress.errors import CompressError
from compress.prune.structured import parse_structured, prune_structured

VOCAB_USED = 100  # token ids drawn below every tiny tokenizer's vocabulary size


def _auto(kind):
    import transformers

    return {"classifier": transformers.AutoModelForSequenceClassification, "masked": transformers.AutoModelForMaskedLM,
            "embedding": transformers.AutoModel}.get(kind, transformers.AutoModelForCausalLM)


def _batches(kind=None, n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB_USED, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0  # one padded row: the statistics must ignore padding
        batch = dict(input_ids=ids, attention_mask=mask)
        if kind == "classifier":
            batch["labels"] = torch.tensor([0, 2])
        out.append(batch)
    return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("text,expected", [
    ("heads=0.25,ffn=0.3", {"heads": 0.25, "ffn": 0.3}),
    (" ffn = 0.5 ", {"ffn": 0.5}),
    ("heads=0", {"heads": 0.0}),
])
def test_parse_structured(text, expected):
    assert parse_structured(text) == expected


@pytest.mark.parametrize("text", ["heads=1", "ffn=-0.1", "heads=0.2,heads=0.3", "layers=0.5", "heads", "heads=abc",
                                  "", "ffn=nan"])
def test_parse_structured_rejects(text):
    with pytest.raises(CompressError):
        parse_structured(text)


# arch, kind, heads, ffn, importance, query heads after, kv heads after, neurons after (tiny: 4 heads, 2 kv, 80)
CASES = [
    ("bert", "classifier", 0.5, 0.3, "taylor", 2, 2, 56),
    ("bert", "masked", 0.25, 0.0, "activation", 3, 3, 80),
    ("llama", None, 0.5, 0.25, "weight", 2, 1, 60),
    ("qwen2", None, 0.5, 0.5, "taylor", 2, 1, 40),
    ("mistral", None, 0.0, 0.5, "activation", 4, 2, 40),
]


@pytest.mark.parametrize("arch,kind,heads,ffn,importance,q_after,kv_after,n_after", CASES)
def test_prune_shapes_params_and_stock_reload(tiny_model, tmp_path, arch, kind, heads, ffn, importance,
                                              q_after, kv_after, n_after):
    import transformers

    auto = _auto(kind)
    model = auto.from_pretrained(tiny_model(arch, kind)).eval()
    hidden, head_dim = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    batches = _batches(kind)
    report = prune_structured(model, heads=heads, ffn=ffn, importance=importance, batches=batches)

    assert report.heads == (4, q_after) and report.ffn == (80, n_after)
    layers = model.bert.encoder.layer if arch == "bert" else model.model.layers
    for layer in layers:
        if arch == "bert":
            att = layer.attention.self
            assert att.query.weight.shape == (q_after * head_dim, hidden) == att.key.weight.shape == att.value.weight.shape
            assert layer.attention.output.dense.weight.shape == (hidden, q_after * head_dim)
            assert layer.intermediate.dense.weight.shape == (n_after, hidden)
            assert layer.output.dense.weight.shape == (hidden, n_after)
        else:
            att, mlp = layer.self_attn, layer.mlp
            assert att.q_proj.weight.shape == (q_after * head_dim, hidden)
            assert att.k_proj.weight.shape == (kv_after * head_dim, hidden) == att.v_proj.weight.shape
            assert att.o_proj.weight.shape == (hidden, q_after * head_dim)
            assert mlp.gate_proj.weight.shape == (n_after, hidden) == mlp.up_proj.weight.shape
            assert mlp.down_proj.weight.shape == (hidden, n_after)
    # exactly the removed rows and columns (and the row biases) are gone
    rq, n_removed = 4 - q_after, 80 - n_after
    if arch == "bert":
        per_layer = rq * (3 * head_dim * (hidden + 1) + head_dim * hidden) + n_removed * (2 * hidden + 1)
    else:
        b = 1 if arch == "qwen2" else 0  # Qwen2 has q/k/v biases
        rkv = 2 - kv_after
        per_layer = rq * head_dim * (2 * hidden + b) + rkv * 2 * head_dim * (hidden + b) + n_removed * 3 * hidden
    assert report.params_before - report.params_after == 2 * per_layer
    assert report.params_after == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "pruned")
    # stock transformers: plain from_pretrained for Llama-family and FFN-only BERT, trust_remote_code for
    # BERT with heads removed (transformers 5 has no pruned_heads of its own)
    needs_code = arch == "bert" and heads > 0
    reloaded = auto.from_pretrained(tmp_path / "pruned", trust_remote_code=needs_code).eval()
    assert isinstance(reloaded, transformers.PreTrainedModel)
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    if arch != "bert":
        assert reloaded.config.num_attention_heads == q_after and reloaded.config.num_key_value_heads == kv_after
        assert reloaded.config.intermediate_size == n_after and reloaded.config.head_dim == head_dim


def test_bert_heads_need_trusted_code_to_reload(tiny_model, tmp_path):
    """Without trust_remote_code transformers refuses the folder instead of building full-size layers."""
    model = _auto("classifier").from_pretrained(tiny_model("bert", "classifier"))
    prune_structured(model, heads=0.5)
    model.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "pruned_bert.py").is_file()
    with pytest.raises(ValueError):
        _auto("classifier").from_pretrained(tmp_path / "p", trust_remote_code=False)


def test_second_pruning_maps_heads_to_original_indices(tiny_model, tmp_path):
    model = _auto("masked").from_pretrained(tiny_model("bert", "masked")).eval()
    first = prune_structured(model, heads=0.25)
    second = prune_structured(model, heads=0.34)  # one of the three heads left
    assert first.heads == (4, 3) and second.heads == (3, 2)
    pruned = {int(k): v for k, v in model.config.pruned_heads.items()}
    for layer in range(2):
        assert len(pruned[layer]) == 2 and set(first.removed_heads[layer]) <= set(pruned[layer])
    ids = _batches()[0]["input_ids"]
    model.save_pretrained(tmp_path / "p")
    reloaded = _auto("masked").from_pretrained(tmp_path / "p", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize("importance", ["weight", "activation", "taylor"])
def test_importance_removes_dead_units_first(tiny_model, importance):
    """A head group and FFN neurons whose weights are zero contribute nothing: every measure drops them."""
    model = _auto(None).from_pretrained(tiny_model("llama")).eval()
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            att.q_proj.weight[2 * d:4 * d] = 0  # group 1 = query heads 2, 3 and key-value head 1
            att.k_proj.weight[d:2 * d] = 0
            att.v_proj.weight[d:2 * d] = 0
            att.o_proj.weight[:, 2 * d:4 * d] = 0
            for i in (3, 17, 60):
                mlp.gate_proj.weight[i] = 0
                mlp.up_proj.weight[i] = 0
                mlp.down_proj.weight[:, i] = 0
    report = prune_structured(model, heads=0.5, ffn=3 / 80, importance=importance, batches=_batches())
    assert report.removed_heads == [[2, 3], [2, 3]]
    assert report.removed_neurons == [[3, 17, 60], [3, 17, 60]]


def test_minilm_embedding_model(minilm, tmp_path):
    """The embedded sentence-transformers MiniLM: its inner BertModel pruned, saved and reloaded exactly."""
    import transformers

    from compress.models import load

    loaded = load(minilm)
    report = prune_structured(loaded, heads=0.5, ffn=0.5)
    assert report.heads == (12, 6) and report.ffn == (1536, 768)
    assert 0.2 < report.fraction_removed < 0.3  # the 11.7 M embedding table is untouched
    enc = loaded.tokenizer(["structured pruning keeps the config honest"], return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(**enc).last_hidden_state
    loaded.model.save_pretrained(tmp_path / "p")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "p", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**enc).last_hidden_state, expected)
    loaded.tokenizer.save_pretrained(tmp_path / "p")
    again = load(tmp_path / "p", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(again.model(**enc).last_hidden_state, expected)


@pytest.mark.parametrize("arch,kind,kwargs,message", [
    ("llama", None, dict(heads=1.0), "outside"),
    ("llama", None, dict(ffn=-0.2), "outside"),
    ("llama", None, dict(heads=0.25), "grouped-query"),
    ("llama", None, dict(heads=0.75), "grouped-query"),
    ("bert", "masked", dict(heads=0.9), "all 4 attention heads"),
    ("bert", "masked", dict(ffn=0.995), "all 80 FFN neurons"),
    ("bert", "masked", dict(heads=0.5, importance="magnitude"), "importance"),
    ("bert", "masked", dict(ffn=0.5, importance="activation"), "batches"),
    ("bert", "embedding", dict(ffn=0.5, importance="taylor", batches=_batches()), "labels"),
    ("gpt2", None, dict(ffn=0.5), "BERT and Llama"),
])
def test_bad_inputs_leave_the_model_unchanged(tiny_model, arch, kind, kwargs, message):
    model = _auto(kind).from_pretrained(tiny_model(arch, kind))
    before, config_before = _state(model), model.config.to_dict()
    with pytest.raises(CompressError, match=message):
        prune_structured(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before and type(model).__name__.startswith(("Bert", "Llama", "GPT2"))
    assert all(p.grad is None for p in model.parameters())


def test_taylor_on_a_classifier_without_labels(tiny_model):
    """Unlabeled calibration text: the classifier's own predictions stand in for the labels."""
    model = _auto("classifier").from_pretrained(tiny_model("bert", "classifier")).eval()
    report = prune_structured(model, heads=0.5, ffn=0.5, importance="taylor", batches=_batches())
    assert report.heads == (4, 2) and report.ffn == (80, 40)
    assert all(p.grad is None for p in model.parameters())
