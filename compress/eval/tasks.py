"""Accuracy of one model by kind, and the outputs the next models are compared against.

Each ``evaluate_<kind>`` takes a loaded model, the EvalConfig and the reference outputs of the first
model (None for the first model itself), and returns (metrics, outputs):

- causal: perplexity on held-out text; KL of next-token distributions to the reference.
- masked: masked-LM perplexity and top-1 accuracy at 15% masked positions (fixed by the seed); KL there.
- embedding: mean cosine of sentence embeddings to the reference's; top-1 retrieval (query: first half
  of a paragraph, documents: second halves) agreement with the reference and recall@1.
- classifier: accuracy on a labeled file; agreement of predicted classes and KL to the reference.
"""

from __future__ import annotations

import functools

import torch

from ..config import EvalConfig
from ..data import load_labeled, load_texts, paragraphs, token_stream, windows
from ..errors import CompressError
from ..models import LoadedModel
from . import metrics

_EMBED_MAX_TOKENS = 256


@functools.lru_cache(maxsize=4)
def _heldout_texts(data: str, text_field: str) -> tuple[str, ...]:
    return tuple(load_texts(data, "heldout", text_field))


def _heldout(cfg: EvalConfig) -> list[str]:
    """The evaluation texts, read once per process (so later models do not pay for reading them)."""
    return list(_heldout_texts(cfg.data, cfg.text_field))


def _eval_windows(loaded: LoadedModel, cfg: EvalConfig, tokens: int) -> torch.Tensor:
    seqlen = min(cfg.seqlen, loaded.max_positions())
    stream = token_stream(_heldout(cfg), loaded.tokenizer, max_tokens=tokens + 2 * seqlen)
    wins = windows(stream, loaded.tokenizer, seqlen)
    if wins.shape[0] == 0:
        raise CompressError(f"evaluation data {cfg.data} holds fewer than {seqlen} tokens")
    need = -(-tokens // (seqlen - 1))
    return wins[:need]


@torch.inference_mode()
def evaluate_causal(loaded: LoadedModel, cfg: EvalConfig, ref: dict | None):
    model, device = loaded.model, loaded.device
    wins = _eval_windows(loaded, cfg, cfg.ppl_tokens)
    nll, count, kept = 0.0, 0, []
    for row in wins:
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1)
        nll -= float(logp.gather(-1, ids[0, 1:].unsqueeze(-1)).sum())
        count += ids.shape[1] - 1
        have = sum(k.shape[0] for k in kept)
        if have < cfg.kl_tokens:
            kept.append(logp[: cfg.kl_tokens - have].cpu())
    logprobs = torch.cat(kept) if kept else torch.empty(0)
    result = {"perplexity": metrics.perplexity(nll, count), "eval_tokens": count}
    if ref is not None:
        result["kl"] = _kl(ref, wins, logprobs)
    return result, {"tokens": wins, "logprobs": logprobs}


@torch.inference_mode()
def evaluate_masked(loaded: LoadedModel, cfg: EvalConfig, ref: dict | None):
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    if tok.mask_token_id is None:
        raise CompressError(f"masked-LM model {loaded.name} has a tokenizer without a mask token")
    wins = _eval_windows(loaded, cfg, cfg.ppl_tokens)
    special = torch.isin(wins, torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long))
    gen = torch.Generator().manual_seed(cfg.seed)
    chosen = (torch.rand(wins.shape, generator=gen) < 0.15) & ~special
    nll, correct, count, kept = 0.0, 0, 0, []
    for row, pick in zip(wins, chosen):
        if not pick.any():
            continue
        ids = row.clone()
        ids[pick] = tok.mask_token_id
        logits = model(input_ids=ids.unsqueeze(0).to(device)).logits[0][pick.to(device)].float()
        logp = torch.log_softmax(logits, -1)
        target = row[pick].to(device)
        nll -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
        correct += int((logp.argmax(-1) == target).sum())
        count += int(pick.sum())
        have = sum(k.shape[0] for k in kept)
        if have < cfg.kl_tokens:
            kept.append(logp[: cfg.kl_tokens - have].cpu())
    logprobs = torch.cat(kept) if kept else torch.empty(0)
    result = {"mlm_perplexity": metrics.perplexity(nll, count), "mlm_accuracy": correct / max(count, 1),
              "eval_tokens": count}
    if ref is not None:
        result["kl"] = _kl(ref, wins, logprobs)
    return result, {"tokens": wins, "logprobs": logprobs}


def _kl(ref: dict, tokens: torch.Tensor, logprobs: torch.Tensor) -> float | None:
    """KL to the reference when both saw the same tokens and share a vocabulary, else None."""
    if ref.get("tokens") is None or not torch.equal(ref["tokens"], tokens):
        return None
    if ref["logprobs"].shape != logprobs.shape:
        return None
    return metrics.kl_divergence(ref["logprobs"], logprobs)


def _encode(loaded: LoadedModel, texts: list[str], max_tokens: int):
    return loaded.tokenizer(texts, padding=True, truncation=True, max_length=min(max_tokens, loaded.max_positions()),
                            return_tensors="pt")


@torch.inference_mode()
def embed_texts(loaded: LoadedModel, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [len(texts), D] in float32 on the CPU."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = _encode(loaded, texts[start:start + batch_size], _EMBED_MAX_TOKENS)
        out.append(loaded.embed(enc["input_ids"].to(loaded.device), enc["attention_mask"].to(loaded.device)).float().cpu())
    return torch.cat(out)


def embedding_texts(cfg: EvalConfig) -> tuple[list[str], list[str], list[str]]:
    """(paragraphs, queries, documents): each paragraph split into its first and second half of words."""
    paras = paragraphs(_heldout(cfg), min_words=16)[: cfg.samples]
    if len(paras) < 2:
        raise CompressError(f"evaluation data {cfg.data} has fewer than 2 paragraphs of 16 words or more")
    halves = [p.split() for p in paras]
    queries = [" ".join(w[: len(w) // 2]) for w in halves]
    docs = [" ".join(w[len(w) // 2:]) for w in halves]
    return paras, queries, docs


def evaluate_embedding(loaded: LoadedModel, cfg: EvalConfig, ref: dict | None):
    paras, queries, docs = embedding_texts(cfg)
    emb = embed_texts(loaded, paras, cfg.batch_size)
    hits = metrics.top1(embed_texts(loaded, queries, cfg.batch_size), embed_texts(loaded, docs, cfg.batch_size))
    result = {"recall_at_1": metrics.agreement(hits, torch.arange(len(paras))), "samples": len(paras)}
    if ref is not None:
        same = ref["emb"].shape == emb.shape
        result["cosine"] = metrics.mean_cosine(ref["emb"], emb) if same else None
        result["retrieval_agreement"] = metrics.agreement(ref["top1"], hits) if same else None
    return result, {"emb": emb, "top1": hits}


def _label_ids(loaded: LoadedModel, labels: list[str]) -> torch.Tensor:
    label2id = {str(k): int(v) for k, v in (getattr(loaded.config, "label2id", None) or {}).items()}
    n = loaded.config.num_labels
    ids = []
    for label in labels:
        if label in label2id:
            ids.append(label2id[label])
        elif label.lstrip("-").isdigit() and 0 <= int(label) < n:
            ids.append(int(label))
        else:
            raise CompressError(f"label '{label}' is not one of the model's labels ({', '.join(label2id) or n})")
    return torch.tensor(ids)


@torch.inference_mode()
def evaluate_classifier(loaded: LoadedModel, cfg: EvalConfig, ref: dict | None):
    if cfg.labeled:
        texts, labels = load_labeled(cfg.labeled, cfg.text_field, cfg.label_field)
        targets = _label_ids(loaded, labels)
    else:
        texts, targets = paragraphs(_heldout(cfg), min_words=8)[: cfg.samples], None
    logps = []
    for start in range(0, len(texts), cfg.batch_size):
        enc = _encode(loaded, texts[start:start + cfg.batch_size], 512)
        logits = loaded.model(**{k: v.to(loaded.device) for k, v in enc.items()}).logits.float()
        logps.append(torch.log_softmax(logits, -1).cpu())
    logprobs = torch.cat(logps)
    pred = logprobs.argmax(-1)
    result = {"samples": len(texts)}
    if targets is not None:
        result["accuracy"] = metrics.agreement(pred, targets)
    if ref is not None and ref["logprobs"].shape == logprobs.shape:
        result["kl"] = metrics.kl_divergence(ref["logprobs"], logprobs)
        result["agreement"] = metrics.agreement(ref["logprobs"].argmax(-1), pred)
    return result, {"logprobs": logprobs}


EVALUATORS = {
    "causal": evaluate_causal,
    "masked": evaluate_masked,
    "embedding": evaluate_embedding,
    "classifier": evaluate_classifier,
}
