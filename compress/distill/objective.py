"""The student plus the learnable parts of the distillation objective, trained as one module.

:class:`DistillationModel` wraps any student (a transformers model or a module called like one) together
with the projections that map its hidden widths onto the teacher's. Its ``forward`` takes a batch and
the teacher's outputs for that batch and returns the loss, so the whole objective runs inside the module
that DDP, FSDP or DeepSpeed wrap: gradients of the projections are synchronised like the student's, and
FSDP never sees a parameter used outside its forward. The teacher is not part of it.

Loss (see compress/config.py DistillConfig and compress/distill/losses.py):

    alpha * soft + (1 - alpha) * hard + hidden_weight * hidden + attn_weight * attention + cosine_weight * cosine
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DistillConfig
from ..errors import CompressError
from ..models import Pooling
from . import losses


@dataclass
class Widths:
    """What a probe forward pass learned about the two models (see ``trainer.probe``)."""

    student_states: list[int]  # width of each student hidden state (embedding output first)
    teacher_states: list[int]
    student_outputs: int  # classes / vocabulary entries / embedding width
    teacher_outputs: int


def last_hidden(out) -> torch.Tensor:
    """The last hidden state [B, T, D] of a transformers output (base models and heads alike)."""
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if getattr(out, "hidden_states", None):
        return out.hidden_states[-1]
    return out[0]


class DistillOutput(dict):
    """loss (scalar) and logits (classify: [B, C]); a dict, so the Trainer's evaluation loop can read it."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DistillationModel(nn.Module):
    """Student + projections; ``forward(**batch, teacher=signals)`` returns a DistillOutput with the loss.

    Args:
        student: the model being trained.
        config: the DistillConfig (task, temperature, alpha, term weights, layer map).
        widths: hidden and output widths of both models (projections are made where they differ).
        layer_map: [student state, teacher state] pairs for the hidden-state term; the attention term
            uses the same pairs minus the embedding pair (state i is the output of block i - 1).
        pooling: how the student's token states become a sentence embedding (embed task).
        token_map: (student ids, teacher ids) of a vocabulary map, for token-level soft losses.
    """

    accepts_loss_kwargs = False  # tells the Trainer the loss is a per-batch mean it must scale for accumulation

    def __init__(self, student: nn.Module, config: DistillConfig, widths: Widths | None = None,
                 layer_map: list[list[int]] | None = None, pooling: Pooling | None = None,
                 token_map: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.student = student
        self.distill_config = config
        self.layer_map = [list(p) for p in (layer_map or [])]
        self.attn_pairs = [[s - 1, t - 1] for s, t in self.layer_map if s > 0 and t > 0]
        self.pooling = pooling or Pooling("mean", False)
        self._no_split_modules = getattr(student, "_no_split_modules", None)  # FSDP's auto-wrap policy reads it
        if token_map is not None:
            self.register_buffer("map_student_ids", token_map[0].clone(), persistent=False)
            self.register_buffer("map_teacher_ids", token_map[1].clone(), persistent=False)
        else:
            self.map_student_ids = self.map_teacher_ids = None
        heads = {}
        if widths is not None:
            if config.hidden_weight > 0:
                for k, (si, ti) in enumerate(self.layer_map):
                    if widths.student_states[si] != widths.teacher_states[ti]:
                        heads[f"hidden_{k}"] = losses.Projection(widths.student_states[si], widths.teacher_states[ti])
            if config.cosine_weight > 0 and widths.student_states[-1] != widths.teacher_states[-1]:
                heads["cosine"] = losses.Projection(widths.student_states[-1], widths.teacher_states[-1])
            if config.task == "embed" and widths.student_outputs != widths.teacher_outputs:
                heads["embedding"] = losses.Projection(widths.student_outputs, widths.teacher_outputs)
        self.heads = nn.ModuleDict(heads)
        self.last_parts: dict[str, torch.Tensor] = {}  # the unweighted terms of the last batch, for logging

    def gradient_checkpointing_enable(self, **kwargs):
        """Passed to the student, so the Trainer's --gradient_checkpointing works on the wrapper."""
        if hasattr(self.student, "gradient_checkpointing_enable"):
            self.student.gradient_checkpointing_enable(**kwargs)

    def student_forward(self, input_ids, attention_mask=None, token_type_ids=None):
        cfg = self.distill_config
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if cfg.hidden_weight > 0 or cfg.cosine_weight > 0:
            kwargs["output_hidden_states"] = True
        if cfg.attn_weight > 0:
            kwargs["output_attentions"] = True
        return self.student(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                teacher: dict | None = None) -> DistillOutput:
        """The loss of one batch.

        Args:
            input_ids, attention_mask, token_type_ids: the student's inputs [B, T].
            labels: classify [B] class ids; mlm [B, T] original ids at masked positions, -100 elsewhere;
                causal [B, T] the inputs (shifted here); embed: none.
            teacher: the teacher's outputs for the same batch: ``logits`` (or ``embedding`` [B, D_t]
                for embed), and ``hidden_states`` / ``attentions`` when those terms are on. None
                trains on the hard target alone (alpha 0, no other term).
        """
        cfg = self.distill_config
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        out = self.student_forward(input_ids, attention_mask, token_type_ids)
        parts: dict[str, torch.Tensor] = {}
        if cfg.task == "embed":
            emb = self.pooling(last_hidden(out), mask)
            logits = emb
            loss = emb.sum() * 0.0
            if teacher is not None:
                parts["hard"] = losses.embedding_loss(emb, teacher["embedding"], cfg.embed_loss, self.heads["embedding"]
                                                      if "embedding" in self.heads else None)
                loss = loss + (1 - cfg.alpha) * parts["hard"]
                if cfg.alpha > 0:
                    parts["soft"] = losses.similarity_kd_loss(emb, teacher["embedding"], cfg.similarity_temperature)
                    loss = loss + cfg.alpha * parts["soft"]
        else:
            logits = out.logits
            s_logits, t_logits, kd_labels, kd_mask = logits, None, labels, None
            if teacher is not None and cfg.alpha > 0:
                t_logits = teacher["logits"]
                if self.map_student_ids is not None and cfg.task != "classify":
                    s_logits = s_logits[..., self.map_student_ids]
                    t_logits = t_logits[..., self.map_teacher_ids]
                elif s_logits.shape[-1] != t_logits.shape[-1]:  # padded vocabularies of one tokenizer
                    n = min(s_logits.shape[-1], t_logits.shape[-1])
                    s_logits, t_logits = s_logits[..., :n], t_logits[..., :n]
            if cfg.task == "mlm" and labels is not None:
                kd_mask = labels != losses.IGNORE_INDEX  # DistilBERT: the soft term at the masked positions
            elif cfg.task == "causal":
                # position i predicts token i + 1: shift everything, count positions whose target is real
                s_logits = s_logits[:, :-1]
                t_logits = t_logits[:, :-1] if t_logits is not None else None
                kd_mask = mask[:, 1:]
                kd_labels = labels[:, 1:].masked_fill(mask[:, 1:] == 0, losses.IGNORE_INDEX) if labels is not None else None
            hard_logits = logits[:, :-1] if cfg.task == "causal" else logits
            loss, parts = losses.kd_loss(s_logits, t_logits, None, cfg.temperature, cfg.alpha if t_logits is not None else 0.0,
                                         kd_mask)
            if cfg.alpha < 1 and kd_labels is not None:
                parts["hard"] = losses.hard_label_loss(hard_logits, kd_labels)
                loss = loss + (1 - cfg.alpha) * parts["hard"]
        if teacher is not None and cfg.hidden_weight > 0:
            projections = [self.heads[f"hidden_{k}"] if f"hidden_{k}" in self.heads else None for k in range(len(self.layer_map))]
            parts["hidden"] = losses.hidden_state_loss(out.hidden_states, teacher["hidden_states"], self.layer_map, mask, projections)
            loss = loss + cfg.hidden_weight * parts["hidden"]
        if teacher is not None and cfg.attn_weight > 0:
            parts["attn"] = losses.attention_map_loss(out.attentions, teacher["attentions"], self.attn_pairs, mask)
            loss = loss + cfg.attn_weight * parts["attn"]
        if teacher is not None and cfg.cosine_weight > 0:
            parts["cos"] = losses.cosine_loss(out.hidden_states[-1], teacher["hidden_states"][-1], mask,
                                              self.heads["cosine"] if "cosine" in self.heads else None)
            loss = loss + cfg.cosine_weight * parts["cos"]
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return DistillOutput(loss=loss, logits=logits)


def check_layer_map(layer_map: list[list[int]], widths: Widths) -> None:
    """CompressError when a pair points past the models' hidden states."""
    ns, nt = len(widths.student_states), len(widths.teacher_states)
    for s, t in layer_map:
        if s >= ns or t >= nt:
            raise CompressError(f"layer map pair [{s}, {t}] is out of range: the student has hidden states 0 to {ns - 1} "
                                f"and the teacher 0 to {nt - 1}")
