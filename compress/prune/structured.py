"""Structured pruning: remove whole attention heads and FFN neurons, and rewrite the config to match.

Rows and columns are physically removed, so the model gets smaller and faster without sparse kernels,
and ``save_pretrained`` writes a folder that transformers' ``from_pretrained`` loads back exactly.

Two block layouts are recognised by their attribute names (no class per architecture):

- BERT: ``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``.
- Llama family (Llama, Mistral, Qwen2 with its q/k/v biases, ...): ``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``.

Every layer loses the same number of heads and neurons, ranked within the layer. Llama-family configs
hold one ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` for all layers, and
BERT one ``intermediate_size``, so the widths must be uniform; a uniform count also keeps the layers'
costs balanced. (BERT heads could differ per layer, but uniform counts keep one rule for both.)

Grouped-query attention: whole key-value groups are removed, each group being one key-value head and the
query heads that read it. Every remaining key-value head keeps exactly the query heads it was trained
with, so no query is re-wired to keys and values it never saw; the key and value projections (and the
KV cache at generation time) shrink in proportion with the query projection; and with one query head
per group (plain multi-head attention) the rule is simply "remove heads". The price is granularity:
a ratio must remove a whole number of groups (steps of 1/num_key_value_heads), and a ratio that does not
is refused with the nearest ratios that work.

BERT heads: transformers 5 derives BERT's head size from ``hidden_size / num_attention_heads`` and has
dropped the ``pruned_heads`` config entry that 4.x honoured, so a BERT with fewer heads per layer has no
stock class. The pruned model is given the subclasses of :mod:`compress.prune.pruned_bert` (stock BERT
plus head removal from ``config.pruned_heads`` at construction); ``save_pretrained`` copies that file
and an ``auto_map`` into the folder, and ``AutoModel*.from_pretrained(folder, trust_remote_code=True)``
loads it. FFN-only pruning needs no code: ``intermediate_size`` alone describes it.

Importance (higher = kept):

- ``weight``: the L2 norm of every weight and bias entry that belongs to the unit.
- ``activation``: how much the unit feeds the output projection on ``batches``: the root mean square
  of its inputs to the output projection (attention context or FFN activation, over non-padding
  tokens) times the norm of its columns there.
- ``taylor``: first-order Taylor, sum over the unit's weights and biases of |w * dL/dw|, the gradient
  summed over ``batches``; L is the model's own loss when the batches carry ``labels``, else the
  language-modelling loss on ``input_ids`` (causal or masked LM heads), or for a classifier the loss
  against its own predictions (calibration text has no labels); a bare encoder needs labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CompressError

IMPORTANCES = ("weight", "activation", "taylor")
PARTS = ("heads", "ffn")


# --------------------------------------------------------------------------------------------------
# Parsing and the report


def parse_structured(text: str) -> dict[str, float]:
    """Parse ``"heads=0.25,ffn=0.3"`` into ``{"heads": 0.25, "ffn": 0.3}`` (either part may be left out).

    Each ratio is the fraction of a layer's heads or FFN neurons to remove, in [0, 1).
    Raises CompressError on unknown names, repeated names, non-numbers and ratios outside [0, 1).
    """
    parts: dict[str, float] = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in PARTS:
            raise CompressError(f"structured pruning takes heads=RATIO and ffn=RATIO separated by commas, not '{item}'")
        if name in parts:
            raise CompressError(f"'{name}' appears twice in '{text}': give each ratio once")
        try:
            ratio = float(value)
        except ValueError:
            raise CompressError(f"the {name} ratio '{value.strip()}' is not a number: use a fraction such as 0.25") from None
        parts[name] = check_ratio(name, ratio)
    if not parts:
        raise CompressError(f"'{text}' names nothing to prune: use for example heads=0.25,ffn=0.3")
    return parts


def check_ratio(name: str, ratio) -> float:
    """``ratio`` as a float, or CompressError when it is not a number in [0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise CompressError(f"the {name} ratio must be a number in [0, 1), not {ratio!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise CompressError(f"the {name} ratio {ratio} is outside [0, 1): give the fraction to remove, for example 0.25")
    return value


@dataclass
class StructuredReport:
    """What :func:`prune_structured` removed.

    Attributes:
        params_before, params_after: parameter counts of the whole model (shared tensors once).
        importance: the importance measure that ranked heads and neurons.
        heads: query heads per layer, before and after.
        kv_heads: key-value heads per layer, before and after (equal to ``heads`` without GQA).
        ffn: FFN intermediate neurons per layer, before and after.
        removed_heads, removed_neurons: for each layer, the indices removed (among the layer's heads
            or neurons before this call).
    """

    params_before: int
    params_after: int
    importance: str
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    layers: int
    removed_heads: list[list[int]] = field(default_factory=list)
    removed_neurons: list[list[int]] = field(default_factory=list)

    @property
    def fraction_removed(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def lines(self) -> list[str]:
        """A short human-readable summary."""
        (h0, h1), (k0, k1), (f0, f1) = self.heads, self.kv_heads, self.ffn
        kv = f" ({k0} -> {k1} key-value heads)" if k0 != h0 else ""
        return [
            f"structured pruning by {self.importance} importance over {self.layers} layers:",
            f"  attention heads per layer {h0} -> {h1}{kv}",
            f"  FFN neurons per layer {f0} -> {f1}",
            (f"  parameters {self.params_before / 1e6:.2f} M -> {self.params_after / 1e6:.2f} M "
             f"({self.fraction_removed:.1%} removed)"),
        ]


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------------
# Finding heads and neurons


@dataclass
class Layer:
    """One block's prunable parts, in a layout-independent form.

    ``q``/``k``/``v`` rows are ``heads * head_dim`` / ``kv_heads * head_dim``; ``o`` reads the query heads'
    outputs as columns. ``ffn_in`` are the Linear layers whose rows are FFN neurons (gate and up, or
    BERT's intermediate), ``ffn_out`` the one whose columns are.
    """

    kind: str  # "bert" or "llama"
    attention: nn.Module
    mlp: nn.Module | None
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    ffn_in: list[nn.Linear]
    ffn_out: nn.Linear
    head_dim: int
    heads: int
    kv_heads: int

    @property
    def group(self) -> int:
        """Query heads per key-value head."""
        return self.heads // self.kv_heads

    @property
    def neurons(self) -> int:
        return self.ffn_out.in_features

    def unit_slices(self) -> list[tuple[nn.Linear, int, torch.Tensor]]:
        """For the head groups: (linear, dim, index [groups, per-group entries]) of every matrix they span."""
        d, g, n = self.head_dim, self.group, self.kv_heads
        q_rows = torch.arange(n * g * d).view(n, g * d)
        kv_rows = torch.arange(n * d).view(n, d)
        return [(self.q, 0, q_rows), (self.k, 0, kv_rows), (self.v, 0, kv_rows), (self.o, 1, q_rows)]

    def neuron_slices(self) -> list[tuple[nn.Linear, int]]:
        return [(lin, 0) for lin in self.ffn_in] + [(self.ffn_out, 1)]


def _linear(module: nn.Module | None, name: str) -> nn.Linear | None:
    child = getattr(module, name, None) if module is not None else None
    return child if isinstance(child, nn.Linear) else None


def _bert_layer(block: nn.Module) -> Layer | None:
    attention = getattr(block, "attention", None)
    self_attn = getattr(attention, "self", None)
    q, k, v = (_linear(self_attn, n) for n in ("query", "key", "value"))
    o = _linear(getattr(attention, "output", None), "dense")
    inter = _linear(getattr(block, "intermediate", None), "dense")
    out = _linear(getattr(block, "output", None), "dense")
    if None in (q, k, v, o, inter, out) or not hasattr(self_attn, "attention_head_size"):
        return None
    heads = self_attn.num_attention_heads
    return Layer("bert", attention, None, q, k, v, o, [inter], out, self_attn.attention_head_size, heads, heads)


def _llama_layer(block: nn.Module) -> Layer | None:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    q, k, v, o = (_linear(attn, f"{n}_proj") for n in "qkvo")
    up, down, gate = _linear(mlp, "up_proj"), _linear(mlp, "down_proj"), _linear(mlp, "gate_proj")
    if None in (q, k, v, o, up, down) or not hasattr(attn, "head_dim"):
        return None
    d = attn.head_dim
    if q.out_features % d or k.out_features % d or (q.out_features // d) % (k.out_features // d):
        return None
    return Layer("llama", attn, mlp, q, k, v, o, [m for m in (gate, up) if m is not None], down, d,
                 q.out_features // d, k.out_features // d)


def find_layers(model: nn.Module) -> list[Layer]:
    """The prunable parts of every block of ``model``; CompressError for layouts this module does not know."""
    from ..models import find_blocks

    _, blocks = find_blocks(model)
    layers = []
    for block in blocks:
        layer = _bert_layer(block) or _llama_layer(block)
        if layer is None:
            raise CompressError(
                f"structured pruning supports BERT and Llama-family blocks (Llama, Mistral, Qwen2), not "
                f"{type(block).__name__}: use unstructured pruning for this model")
        layers.append(layer)
    first = layers[0]
    if any((lay.heads, lay.kv_heads, lay.neurons) != (first.heads, first.kv_heads, first.neurons) for lay in layers):
        raise CompressError("the layers of this model differ in width, and structured pruning keeps widths uniform")
    return layers


# --------------------------------------------------------------------------------------------------
# Planning (all checks happen here, before anything changes)


def _count(ratio: float, total: int) -> int:
    return math.floor(ratio * total + 0.5)


def plan_counts(layer: Layer, heads: float, ffn: float) -> tuple[int, int]:
    """(key-value groups to remove, FFN neurons to remove) per layer; CompressError when impossible."""
    n_heads = _count(heads, layer.heads)
    if heads > 0 and n_heads >= layer.heads:
        raise CompressError(f"heads={heads} would remove all {layer.heads} attention heads of each layer: use a smaller ratio")
    if n_heads % layer.group:
        g, n = layer.group, layer.kv_heads
        options = ", ".join(f"{i / n:g}" for i in range(n))
        raise CompressError(
            f"heads={heads} removes {n_heads} of {layer.heads} query heads, which breaks grouped-query attention "
            f"({n} key-value heads of {g} query heads each are removed whole): use one of heads={options}")
    n_ffn = _count(ffn, layer.neurons)
    if ffn > 0 and n_ffn >= layer.neurons:
        raise CompressError(f"ffn={ffn} would remove all {layer.neurons} FFN neurons of each layer: use a smaller ratio")
    return n_heads // layer.group, n_ffn


# --------------------------------------------------------------------------------------------------
# Importance


def _unit_sum(linear: nn.Linear, dim: int, index: torch.Tensor, values_w: torch.Tensor,
              values_b: torch.Tensor | None) -> torch.Tensor:
    """Sum of per-entry values over each unit's rows (dim 0, bias included) or columns (dim 1) -> [units]."""
    per_line = values_w.sum(1 - dim)  # one value per row (dim 0) or column (dim 1)
    if dim == 0 and values_b is not None:
        per_line = per_line + values_b
    return per_line[index.to(per_line.device)].reshape(index.shape[0], -1).sum(1)


def _entry_scores(linear: nn.Linear, importance: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = linear.weight.detach().float(), linear.bias.detach().float() if linear.bias is not None else None
    if importance == "weight":
        return w.square(), b.square() if b is not None else None
    gw = linear.weight.grad.float()
    gb = linear.bias.grad.float() if b is not None else None
    return (w * gw).abs(), (b * gb).abs() if b is not None else None


def static_scores(layer: Layer, importance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(group scores [kv_heads], neuron scores [neurons]) from the weights (and their gradients for taylor)."""
    groups = torch.zeros(layer.kv_heads)
    for linear, dim, index in layer.unit_slices():
        groups += _unit_sum(linear, dim, index, *_entry_scores(linear, importance)).cpu()
    neurons = torch.zeros(layer.neurons)
    all_neurons = torch.arange(layer.neurons).view(-1, 1)
    for linear, dim in layer.neuron_slices():
        neurons += _unit_sum(linear, dim, all_neurons, *_entry_scores(linear, importance)).cpu()
    if importance == "weight":
        return groups.sqrt(), neurons.sqrt()
    return groups, neurons


def _batches_on(batches, device):
    for batch in batches:
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def activation_scores(model: nn.Module, layers: list[Layer], batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (group scores, neuron scores) = RMS of each unit's input to the output projection
    (non-padding tokens) x the norm of its columns there."""
    sums = [[torch.zeros(lay.o.in_features), torch.zeros(lay.ffn_out.in_features)] for lay in layers]
    tokens = [0.0]
    mask_now: list[torch.Tensor | None] = [None]

    def hook(store: torch.Tensor):
        def fn(module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1]).square()
            if mask_now[0] is not None and mask_now[0].numel() * x.shape[-1] == x.numel():
                x = x * mask_now[0].reshape(-1, 1).to(x)
            store.add_(x.sum(0).cpu())
        return fn

    handles = []
    for (ctx, act), lay in zip(sums, layers):
        handles += [lay.o.register_forward_pre_hook(hook(ctx)), lay.ffn_out.register_forward_pre_hook(hook(act))]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches_on(batches, device):
                mask = batch.get("attention_mask")
                mask_now[0] = mask
                tokens[0] += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for (ctx, act), lay in zip(sums, layers):
        rms_ctx, rms_act = (ctx / max(tokens[0], 1)).sqrt(), (act / max(tokens[0], 1)).sqrt()
        col_o = lay.o.weight.detach().float().norm(dim=0).cpu()
        col_f = lay.ffn_out.weight.detach().float().norm(dim=0).cpu()
        per_q = rms_ctx * col_o  # one value per query-head dimension
        groups = per_q.view(lay.kv_heads, -1).square().sum(1).sqrt()
        out.append((groups, rms_act * col_f))
    return out


def _lm_loss_kind(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM"))


def _classifier_kind(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification"))


def accumulate_gradients(model: nn.Module, layers: list[Layer], batches) -> None:
    """Sum the loss gradients over ``batches`` into the pruned Linear layers' ``.grad`` (dropout off)."""
    linears = {id(m): m for lay in layers for m in (lay.q, lay.k, lay.v, lay.o, *lay.ffn_in, lay.ffn_out)}.values()
    params = [p for m in linears for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in _batches_on(batches, device):
                if "labels" not in batch and _lm_loss_kind(model):  # the LM loss on the inputs, padding ignored
                    labels = batch["input_ids"]
                    if batch.get("attention_mask") is not None:
                        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
                    batch = {**batch, "labels": labels}
                elif "labels" not in batch:  # a classifier: its own predictions stand in for the labels
                    with torch.no_grad():
                        labels = model(**batch).logits.argmax(-1)
                    if labels.dim() == 2 and batch.get("attention_mask") is not None:
                        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
                    batch = {**batch, "labels": labels}
                out = model(**batch)
                if getattr(out, "loss", None) is None:
                    raise CompressError("the model returned no loss for the taylor importance: give batches with labels")
                out.loss.backward()
    finally:
        model.train(was_training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    # parameters outside the pruned layers may have collected gradients too: drop them with the rest later
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _clear_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# --------------------------------------------------------------------------------------------------
# Removal


def _keep(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of the units left after removing the ``remove`` lowest scores; ties keep the first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[: scores.numel() - remove].sort().values


def remove_groups(layer: Layer, keep_groups: torch.Tensor) -> None:
    """Remove every key-value group not in ``keep_groups`` (and its query heads) from ``layer``."""
    from .pruned_bert import remove_heads, select_linear

    if layer.kind == "bert":
        drop = sorted(set(range(layer.kv_heads)) - set(keep_groups.tolist()))
        remove_heads(layer.attention, drop)
        return
    for linear, dim, index in layer.unit_slices():
        select_linear(linear, index[keep_groups].reshape(-1), dim)


def remove_neurons(layer: Layer, keep: torch.Tensor) -> None:
    """Keep only the FFN neurons ``keep`` in ``layer``."""
    from .pruned_bert import select_linear

    for linear, dim in layer.neuron_slices():
        select_linear(linear, keep, dim)
    if layer.mlp is not None and hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = len(keep)


def _rewrite_bert_config(model: nn.Module, removed: list[list[int]], neurons: int) -> None:
    from . import pruned_bert

    config = model.config
    config.intermediate_size = neurons
    if not any(removed):
        return
    # removed indices are among the heads present before this call: map them to the original heads
    before = {int(k): sorted(int(h) for h in v) for k, v in (getattr(config, "pruned_heads", None) or {}).items()}
    merged = {}
    for i, drop in enumerate(removed):
        left = [h for h in range(config.num_attention_heads) if h not in before.get(i, [])]
        heads = sorted(set(before.get(i, [])) | {left[h] for h in drop})
        if heads:
            merged[str(i)] = heads
    config.pruned_heads = merged
    cls = pruned_bert.pruned_class_for(model)
    if cls is None:
        raise CompressError(f"{type(model).__name__} is not a BERT class this module can save with heads removed")
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **pruned_bert.auto_map()}
    # the same objects and state under the subclasses that rebuild the smaller shapes on load
    model.__class__ = cls
    config.__class__ = pruned_bert.PrunedBertConfig


def _rewrite_llama_config(model: nn.Module, layer: Layer) -> None:
    config = model.config
    config.head_dim = layer.head_dim  # explicit now that hidden_size / heads no longer gives it
    config.num_attention_heads = layer.heads
    config.num_key_value_heads = layer.kv_heads
    config.intermediate_size = layer.neurons


def prune_structured(model, heads: float = 0.0, ffn: float = 0.0, importance: str = "weight",
                     batches: list[dict] | None = None) -> StructuredReport:
    """Remove a fraction of every layer's attention heads and FFN neurons from ``model``, in place.

    Args:
        model: a Hugging Face BERT model (any head, or the inner model of a sentence-transformers
            folder) or a Llama-family causal LM; a compress ``LoadedModel`` is unwrapped.
        heads: fraction of each layer's query heads to remove, in [0, 1); under grouped-query
            attention whole key-value groups go, so it must remove a whole number of groups.
        ffn: fraction of each layer's FFN intermediate neurons to remove, in [0, 1).
        importance: ``weight``, ``activation`` or ``taylor`` (see the module docstring).
        batches: inputs for ``model(**batch)`` (tensors [batch, tokens]); required by activation and
            taylor. Batches with ``labels`` give taylor the model's own loss.

    Returns:
        A StructuredReport (parameter counts before and after, widths, removed indices).

    Raises:
        CompressError, before the model is changed, for ratios outside [0, 1), a ratio that leaves no
        head or neuron or breaks grouped-query attention, an unknown importance, missing batches, or an
        architecture without BERT or Llama-style blocks.
    """
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    heads, ffn = check_ratio("heads", heads), check_ratio("ffn", ffn)
    if importance not in IMPORTANCES:
        raise CompressError(f"importance '{importance}' is not one of {', '.join(IMPORTANCES)}")
    if importance != "weight" and not batches:
        raise CompressError(f"{importance} importance needs calibration batches: pass batches or use weight importance")
    if (importance == "taylor" and not _lm_loss_kind(model) and not _classifier_kind(model)
            and not all("labels" in b for b in batches)):
        raise CompressError(f"taylor importance on a {type(model).__name__} needs batches with labels for its loss")
    layers = find_layers(model)
    n_groups, n_neurons = plan_counts(layers[0], heads, ffn)
    if heads > 0 and layers[0].kind == "bert" and getattr(model.config, "add_cross_attention", False):
        raise CompressError("removing heads from a BERT with cross-attention is not supported: prune ffn only")
    before = count_params(model)
    first = layers[0]
    shape_before = (first.heads, first.kv_heads, first.neurons)

    if importance == "activation":
        scores = activation_scores(model, layers, batches)
    elif importance == "taylor":
        accumulate_gradients(model, layers, batches)
        try:
            scores = [static_scores(lay, "taylor") for lay in layers]
        finally:
            _clear_gradients(model)
    else:
        scores = [static_scores(lay, "weight") for lay in layers]

    removed_heads, removed_neurons = [], []
    for layer, (group_scores, neuron_scores) in zip(layers, scores):
        keep_g = _keep(group_scores, n_groups)
        keep_n = _keep(neuron_scores, n_neurons)
        g = layer.group
        removed_heads.append([q for grp in sorted(set(range(layer.kv_heads)) - set(keep_g.tolist()))
                              for q in range(grp * g, grp * g + g)])
        removed_neurons.append(sorted(set(range(layer.neurons)) - set(keep_n.tolist())))
        if n_groups:
            remove_groups(layer, keep_g)
        if n_neurons:
            remove_neurons(layer, keep_n)
        layer.heads, layer.kv_heads = len(keep_g) * g, len(keep_g)
    if first.kind == "bert":
        _rewrite_bert_config(model, removed_heads, first.neurons)
    else:
        _rewrite_llama_config(model, first)
    return StructuredReport(params_before=before, params_after=count_params(model), importance=importance,
                            heads=(shape_before[0], first.heads), kv_heads=(shape_before[1], first.kv_heads),
                            ffn=(shape_before[2], first.neurons), layers=len(layers),
                            removed_heads=removed_heads, removed_neurons=removed_neurons)
