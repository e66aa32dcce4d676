"""Distillation losses as pure functions over tensors.

Shapes: ``B`` batch, ``T`` tokens, ``C`` classes or vocabulary entries, ``D`` hidden width, ``H`` heads.
A ``mask`` is [B, T] (or [N] for flat rows) with 1 where a position counts and 0 where it does not
(padding, or for masked-LM distillation every position that was not masked).

- :func:`soft_target_loss`: T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes and averaged
  over the rows that count ("batchmean"). The T^2 factor keeps the gradient's size independent of T
  (Hinton et al. 2015): d/ds of the KL is (softmax(s / T) - softmax(t / T)) / T, so without it a higher
  temperature would silently shrink the soft term's share of the update by T^2.
- :func:`kd_loss`: alpha * soft + (1 - alpha) * cross-entropy with the hard labels.
- :func:`hidden_mse_loss`: mean squared error between a student hidden state (through a learnable
  projection when the widths differ) and the teacher's, over the positions that count.
- :func:`attention_loss`: KL between the teacher's and the student's attention distributions of each
  query row, padded queries and keys excluded (MiniLM's attention transfer).
- :func:`cosine_loss`: 1 - cos(student, teacher) of hidden vectors, averaged over the positions that
  count (DistilBERT's cosine embedding loss on the last hidden states).
- :func:`similarity_kd_loss`: KL between the teacher's and the student's in-batch similarity
  distributions softmax(cos(e_i, e_j) / tau) over the other sentences j, for sentence-embedding distillation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def _flatten(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` [..., C] whose mask [...] is set, as [N, C]."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is None:
        return rows
    return rows[mask.reshape(-1).bool()]


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), "batchmean" over the rows that count.

    Args:
        student_logits, teacher_logits: [..., C] raw scores over the same C classes.
        temperature: T > 0; larger values soften both distributions.
        mask: [...] (the leading dimensions of the logits); rows where it is 0 are left out of the sum
            and of the count. None counts every row.

    Returns:
        A scalar: sum over kept rows and classes of p_t (log p_t - log p_s), divided by the number of
        kept rows, times T^2. Zero (still attached to the graph) when no row is kept.
    """
    s = _flatten(student_logits, mask).float() / temperature
    t = _flatten(teacher_logits, mask).float().detach() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of logits [..., C] against integer labels [...]; labels equal to ``ignore_index`` are skipped."""
    flat_labels = labels.reshape(-1)
    if not (flat_labels != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels, ignore_index=ignore_index)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor | None,
            temperature: float, alpha: float, mask: torch.Tensor | None = None,
            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    Args:
        student_logits, teacher_logits: [..., C]. teacher_logits may be None when alpha is 0.
        labels: integer targets [...] (``ignore_index`` where there is none); None when alpha is 1.
        temperature: T > 0 of the soft term.
        alpha: weight of the soft term in [0, 1].
        mask: rows that count for the soft term (see :func:`soft_target_loss`).

    Returns:
        (loss, {"soft": ..., "hard": ...}) with the unweighted terms that were computed.
    """
    parts: dict[str, torch.Tensor] = {}
    loss = student_logits.sum() * 0.0
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("kd_loss with alpha > 0 needs the teacher's logits")
        parts["soft"] = soft_target_loss(student_logits, teacher_logits, temperature, mask)
        loss = loss + alpha * parts["soft"]
    if alpha < 1 and labels is not None:
        parts["hard"] = hard_label_loss(student_logits, labels, ignore_index)
        loss = loss + (1 - alpha) * parts["hard"]
    return loss, parts


class Projection(nn.Linear):
    """A learnable linear map from the student's width to the teacher's, used only during training.

    Initialised as the zero-padded identity (the student's d_s features land on the teacher's first d_s
    features), which is exact for students whose width was narrowed by slicing the teacher's.
    """

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__(student_width, teacher_width, bias=True)
        with torch.no_grad():
            self.weight.zero_()
            n = min(student_width, teacher_width)
            self.weight[:n, :n] = torch.eye(n)
            self.bias.zero_()


def hidden_mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None,
                    projection: nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between hidden states [B, T, D_s] -> [B, T, D_t], over the positions that count.

    The student's states go through ``projection`` first (required when D_s != D_t). The mean runs over
    every kept position and every feature, so the value does not depend on the amount of padding.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"hidden widths differ ({student_hidden.shape[-1]} vs {teacher_hidden.shape[-1]}) "
                         "and no projection was given")
    s = _flatten(student_hidden, mask).float()
    t = _flatten(teacher_hidden, mask).float().detach()
    if s.shape[0] == 0:
        return student_hidden.sum() * 0.0
    return F.mse_loss(s, t)


def hidden_state_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      layer_map: Sequence[Sequence[int]], mask: torch.Tensor | None = None,
                      projections: Sequence[nn.Module | None] | None = None) -> torch.Tensor:
    """Average of :func:`hidden_mse_loss` over the (student index, teacher index) pairs of ``layer_map``.

    ``student_states`` / ``teacher_states`` are the models' ``hidden_states`` tuples (entry 0 is the
    embedding output, entry i the output of block i); ``projections[k]`` serves pair k.
    """
    total = student_states[0].sum() * 0.0
    for k, (si, ti) in enumerate(layer_map):
        proj = projections[k] if projections is not None else None
        total = total + hidden_mse_loss(student_states[si], teacher_states[ti], mask, proj)
    return total / max(len(layer_map), 1)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None,
                   eps: float = 1e-12) -> torch.Tensor:
    """KL(teacher || student) of attention distributions [B, H, T, T], averaged over heads and real queries.

    Each query row of an attention map is a distribution over keys. Padded keys get zero probability
    in both models' maps and are left out of the sum; padded query rows are left out of the mean. When
    the head counts differ, the maps are averaged over heads first (a head-count-free comparison).

    Args:
        student_attn, teacher_attn: softmax outputs [B, H, T, T] (``output_attentions=True``).
        mask: [B, T] attention mask (1 for real tokens).
    """
    s, t = student_attn.float(), teacher_attn.float().detach()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    # xlogy-style: where the teacher gives a key no weight, the term is 0 whatever the student says
    log_ratio = torch.log(t.clamp_min(eps)) - torch.log(s.clamp_min(eps))
    per_row = (t * log_ratio)
    if mask is not None:
        keys = mask[:, None, None, :].to(per_row.dtype)
        per_row = per_row * keys
    per_row = per_row.sum(-1)  # [B, H, T]
    if mask is None:
        return per_row.mean()
    queries = mask[:, None, :].to(per_row.dtype).expand_as(per_row)
    return (per_row * queries).sum() / queries.sum().clamp_min(1)


def attention_map_loss(student_attns: Sequence[torch.Tensor], teacher_attns: Sequence[torch.Tensor],
                       layer_pairs: Sequence[Sequence[int]], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average of :func:`attention_loss` over (student block, teacher block) index pairs (0-based blocks)."""
    total = student_attns[0].sum() * 0.0
    for si, ti in layer_pairs:
        total = total + attention_loss(student_attns[si], teacher_attns[ti], mask)
    return total / max(len(layer_pairs), 1)


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None,
                projection: nn.Module | None = None) -> torch.Tensor:
    """Mean of 1 - cos(student vector, teacher vector) over the positions that count.

    Works on [B, T, D] hidden states with a [B, T] mask, or on [B, D] sentence embeddings without one.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    s = _flatten(student_hidden, mask).float()
    t = _flatten(teacher_hidden, mask).float().detach()
    if s.shape[0] == 0:
        return student_hidden.sum() * 0.0
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def similarity_kd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(P_t || P_s) of in-batch similarity distributions, averaged over the B rows.

    P[i, j] = softmax over j != i of cos(e_i, e_j) / tau for the B sentence embeddings of a batch. The
    diagonal is left out: every sentence is most similar to itself, and at a low tau that certainty
    would swamp what the teacher says about the other sentences. The widths of the two models may
    differ: only their similarity structure is compared. Zero for a batch of one.

    Args:
        student_emb: [B, D_s]; teacher_emb: [B, D_t]; temperature: tau > 0.
    """
    b = student_emb.shape[0]
    if b < 2:
        return student_emb.sum() * 0.0
    s = F.normalize(student_emb.float(), dim=-1)
    t = F.normalize(teacher_emb.float().detach(), dim=-1)
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    s_logits = (s @ s.t())[off].view(b, b - 1) / temperature
    t_logits = (t @ t.t())[off].view(b, b - 1) / temperature
    return F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), reduction="batchmean", log_target=True)


def embedding_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, kind: str = "mse",
                   projection: nn.Module | None = None) -> torch.Tensor:
    """Regression of sentence embeddings [B, D_s] (projected) onto the teacher's [B, D_t]: MSE or 1 - cosine."""
    if kind == "cosine":
        return cosine_loss(student_emb, teacher_emb, None, projection)
    if projection is not None:
        student_emb = projection(student_emb)
    return F.mse_loss(student_emb.float(), teacher_emb.float().detach())
