"""The reference LM: a small Llama-architecture model trained here, on the built-in corpus, on the CPU.

It stands in for the pretrained LLMs that cannot be downloaded on this machine: a real causal LM with
a trained byte-level BPE tokenizer, grouped-query attention and SwiGLU blocks, small enough to train in
minutes and to quantize in seconds. Training is deterministic (fixed seeds, data order and thread
count) and the result is cached outside the repository, so every benchmark quantizes the same weights.

    python benchmarks/reference_lm.py            # train once (about 15 minutes on two cores), print the folder
    python benchmarks/reference_lm.py --force    # retrain

From Python: ``from reference_lm import ensure_reference_lm; path = ensure_reference_lm()``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

# model and training recipe: any change here changes the cache key, so a new model is trained
RECIPE = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "seqlen": 256,
    "batch_size": 16,
    "steps": 600,
    "lr": 2e-3,
    "warmup": 30,
    "weight_decay": 0.1,
    "seed": 0,
    "threads": 2,
}
EOS = "<|endoftext|>"


def cache_folder() -> Path:
    from compress.calib_data.corpus import cache_dir, corpus_key

    key = hashlib.sha1((json.dumps(RECIPE, sort_keys=True) + corpus_key()).encode()).hexdigest()[:10]
    return cache_dir() / f"reference-lm-{key}"


def train_tokenizer(texts: list[str], folder: Path):
    """Byte-level BPE (GPT-2 style pre-tokenization) trained on the corpus' training split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=RECIPE["vocab_size"], special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS,
                                   model_max_length=RECIPE["max_position_embeddings"])
    fast.save_pretrained(str(folder))
    return fast


def lr_at(step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    peak, warm, total = RECIPE["lr"], RECIPE["warmup"], RECIPE["steps"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_perplexity(model, stream: torch.Tensor, seqlen: int, max_windows: int = 32) -> float:
    model.eval()
    n = min(max_windows, stream.numel() // seqlen)
    windows = stream[: n * seqlen].view(n, seqlen)
    total, count = 0.0, 0
    for batch in windows.split(8):
        out = model(input_ids=batch, labels=batch)
        total += float(out.loss) * batch.shape[0] * (seqlen - 1)
        count += batch.shape[0] * (seqlen - 1)
    model.train()
    return math.exp(total / count)


def train(folder: Path, log=print) -> dict:
    """Train tokenizer and model into ``folder``; returns the training record."""
    import transformers

    from compress.data import load_texts, token_stream

    torch.manual_seed(RECIPE["seed"])
    torch.set_num_threads(RECIPE["threads"])
    train_texts, held_texts = load_texts("builtin", "train"), load_texts("builtin", "heldout")
    start = time.perf_counter()
    tok = train_tokenizer(train_texts, folder)
    stream = token_stream(train_texts, tok)
    held = token_stream(held_texts, tok)
    log(f"tokenizer: {len(tok)} tokens; {stream.numel()} training tokens, {held.numel()} held out "
        f"({time.perf_counter() - start:.0f} s)")

    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=RECIPE["hidden_size"], intermediate_size=RECIPE["intermediate_size"],
        num_hidden_layers=RECIPE["num_hidden_layers"], num_attention_heads=RECIPE["num_attention_heads"],
        num_key_value_heads=RECIPE["num_key_value_heads"], max_position_embeddings=RECIPE["max_position_embeddings"],
        tie_word_embeddings=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    seqlen, bs = RECIPE["seqlen"], RECIPE["batch_size"]
    windows = stream[: stream.numel() // seqlen * seqlen].view(-1, seqlen)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(RECIPE["seed"]))
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": RECIPE["weight_decay"]},
                             {"params": other, "weight_decay": 0.0}], lr=RECIPE["lr"], betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(RECIPE["steps"]):
        idx = order[(torch.arange(bs) + step * bs) % order.numel()]
        batch = windows[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == RECIPE["steps"] - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.perf_counter() - start:.0f} s")
    ppl = heldout_perplexity(model, held, seqlen)
    model.save_pretrained(str(folder))
    record = {"recipe": RECIPE, "parameters": sum(p.numel() for p in model.parameters()),
              "train_tokens_seen": RECIPE["steps"] * bs * seqlen, "final_loss": losses[-1],
              "heldout_perplexity": ppl, "seconds": time.perf_counter() - start}
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"held-out perplexity {ppl:.2f}; {record['parameters'] / 1e6:.2f} M parameters; {record['seconds']:.0f} s")
    return record


def ensure_reference_lm(force: bool = False, log=print) -> Path:
    """The reference LM's folder, training it first if it is not cached yet."""
    folder = cache_folder()
    if (folder / "training.json").is_file() and not force:
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train(tmp, log)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    args = parser.parse_args()
    print(ensure_reference_lm(force=args.force, log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main()
