"""BERT models with attention heads removed, loadable by transformers' own ``from_pretrained``.

transformers 5 builds every BERT layer with ``num_attention_heads`` heads of ``hidden_size /
num_attention_heads`` dimensions and no longer reads the ``pruned_heads`` config entry that 4.x used to
shrink layers before loading weights. So a BERT whose layers keep fewer heads (of the original head size)
has no stock class. This module supplies one per BERT head type: each subclass builds the stock model and
then removes, in every layer, the heads that ``config.pruned_heads`` lists ({layer: [original head
indices]}), so the checkpoint's smaller tensors fit exactly.

compress.prune.structured sets these classes on a pruned model; ``save_pretrained`` then copies this file
into the model folder and records it in the config's ``auto_map``, and
``AutoModelFor...from_pretrained(folder, trust_remote_code=True)`` rebuilds the pruned model. The file
is copied alone, so it imports nothing but torch and transformers.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

# stock BERT class -> the Auto class that loads it
AUTO_CLASSES = {
    "BertModel": "AutoModel",
    "BertForSequenceClassification": "AutoModelForSequenceClassification",
    "BertForMaskedLM": "AutoModelForMaskedLM",
    "BertForTokenClassification": "AutoModelForTokenClassification",
    "BertForQuestionAnswering": "AutoModelForQuestionAnswering",
    "BertForMultipleChoice": "AutoModelForMultipleChoice",
    "BertForPreTraining": "AutoModelForPreTraining",
    "BertForNextSentencePrediction": "AutoModelForNextSentencePrediction",
    "BertLMHeadModel": "AutoModelForCausalLM",
}


def select_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only the output rows (``dim=0``) or input columns (``dim=1``) of ``linear`` listed in ``index``.

    In place, so hooks and references to the module stay valid; works on meta tensors (no data) too.
    """
    index = index.to(linear.weight.device)
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(linear.weight.detach().index_select(dim, index).clone(), requires_grad=grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone(), requires_grad=grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def remove_heads(attention: nn.Module, heads: list[int]) -> None:
    """Remove heads (indices among the layer's current heads) from a BERT ``BertAttention`` module.

    The query, key and value rows of each head and the matching input columns of the output projection
    go; the head size and softmax scaling stay as they were.
    """
    self_attn, out = attention.self, attention.output.dense
    size = self_attn.attention_head_size
    drop = {int(h) for h in heads}
    kept = [h for h in range(self_attn.num_attention_heads) if h not in drop]
    index = torch.tensor([h * size + i for h in kept for i in range(size)], dtype=torch.long)
    for linear in (self_attn.query, self_attn.key, self_attn.value):
        select_linear(linear, index, 0)
    select_linear(out, index, 1)
    self_attn.num_attention_heads = len(kept)
    self_attn.all_head_size = len(kept) * size


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's layer list of any BERT model (base or with a head)."""
    base = getattr(model, model.base_model_prefix, model)
    return base.encoder.layer


def apply_pruned_heads(model: nn.Module, pruned_heads: dict) -> None:
    """Remove ``pruned_heads`` ({layer: [original head indices]}) from a model that has all its heads."""
    layers = encoder_layers(model)
    for layer, heads in (pruned_heads or {}).items():
        if heads:
            remove_heads(layers[int(layer)].attention, sorted(int(h) for h in heads))


class PrunedBertConfig(transformers.BertConfig):
    """BertConfig under its own model type, so that a loader without this file fails instead of building
    full-size layers (stock BERT would re-initialise the mismatched attention weights with a warning)."""

    model_type = "pruned_bert"


def _pruned_class(base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_pruned_heads(self, getattr(config, "pruned_heads", None))

    # _auto_class makes save_pretrained copy this file and write the auto_map entry, as for any custom model
    attrs = {"__init__": __init__, "__module__": __name__, "config_class": PrunedBertConfig,
             "_auto_class": AUTO_CLASSES[base.__name__], "__doc__": f"{base.__name__} with config.pruned_heads removed."}
    return type("Pruned" + base.__name__, (base,), attrs)


PrunedBertModel = _pruned_class(transformers.BertModel)
PrunedBertForSequenceClassification = _pruned_class(transformers.BertForSequenceClassification)
PrunedBertForMaskedLM = _pruned_class(transformers.BertForMaskedLM)
PrunedBertForTokenClassification = _pruned_class(transformers.BertForTokenClassification)
PrunedBertForQuestionAnswering = _pruned_class(transformers.BertForQuestionAnswering)
PrunedBertForMultipleChoice = _pruned_class(transformers.BertForMultipleChoice)
PrunedBertForPreTraining = _pruned_class(transformers.BertForPreTraining)
PrunedBertForNextSentencePrediction = _pruned_class(transformers.BertForNextSentencePrediction)
PrunedBertLMHeadModel = _pruned_class(transformers.BertLMHeadModel)


def auto_map() -> dict[str, str]:
    """The config ``auto_map`` that sends every Auto class to its pruned BERT class in this file."""
    module = __name__.rsplit(".", 1)[-1]
    return {"AutoConfig": f"{module}.PrunedBertConfig",
            **{auto: f"{module}.Pruned{name}" for name, auto in AUTO_CLASSES.items()}}


def pruned_class_for(model: nn.Module) -> type | None:
    """The pruned subclass matching ``model``'s stock BERT class (None for other classes)."""
    for cls in type(model).__mro__:
        if cls.__name__ in AUTO_CLASSES and cls.__module__.startswith("transformers."):
            return globals()["Pruned" + cls.__name__]
    return None
