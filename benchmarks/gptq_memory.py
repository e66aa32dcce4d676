"""Peak memory of GPTQ must not grow with depth: quantize two models of equal width, 4 and 16 blocks.

Each model is a randomly initialised Llama of width 1024 (51 MB of fp32 weights per block), saved once
in the cache. Each quantization runs in its own process, and the process's peak resident set is read
from the kernel (ru_maxrss of that child, through wait4). Loading the whole 16-block model would need about 600 MB
more than the 4-block one; block-by-block quantization holds one block at a time.

    python benchmarks/gptq_memory.py            # prints a Markdown table and the ratio
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

WIDTH, INTERMEDIATE, VOCAB = 1024, 2816, 4096
DEPTHS = (4, 16)
QUANTIZE = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--nsamples", "32", "--seqlen", "256",
            "--no-eval", "--overwrite", "--device", "cpu"]


def model_folder(depth: int) -> Path:
    """A random Llama with ``depth`` blocks and a byte-level BPE tokenizer (the reference LM's recipe), built once."""
    from compress.calib_data.corpus import cache_dir

    folder = cache_dir() / f"depth-{WIDTH}x{depth}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from reference_lm import train_tokenizer

    from compress.data import load_texts

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(load_texts("builtin", "train"), folder)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=INTERMEDIATE,
                                      num_hidden_layers=depth, num_attention_heads=16, num_key_value_heads=4,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(depth)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return folder


def measure(depth: int, out_root: Path) -> dict:
    """Quantize in a child process; its wall time and peak resident set."""
    folder = model_folder(depth)
    start = time.perf_counter()
    log = out_root / f"q{depth}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "compress", "quantize", "--model", str(folder),
                                 "--out", str(out_root / f"q{depth}"), *QUANTIZE], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(log.read_text())
    peak_kb = usage.ru_maxrss
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"blocks": depth, "weights_mb": weights / 1e6, "peak_rss_mb": peak_kb / 1024, "seconds": time.perf_counter() - start}


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(d, Path(tmp)) for d in DEPTHS]
    print("| blocks | fp32 weights MB | peak RSS MB | wall s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['weights_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |")
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"\npeak RSS ratio {DEPTHS[-1]} / {DEPTHS[0]} blocks: {ratio:.3f} (target 1.3 or less)")
    print(json.dumps({"rows": rows, "ratio": ratio}))


if __name__ == "__main__":
    main()
