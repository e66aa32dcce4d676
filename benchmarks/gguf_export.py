"""GGUF export: speed against llama.cpp's own converter, and every type verified in llama.cpp.

(Named gguf_export.py because a benchmarks/gguf.py would shadow the gguf package on sys.path.)

1. Speed (--speed): `compress export gguf` and llama.cpp's convert_hf_to_gguf.py (from the
   llama-cpp-python source distribution, run with its own gguf-py) convert the same model to f16 and
   q8_0, alternating, each in its own process: wall time and peak resident set, median of --repeats.
2. Verification (--verify): every export type of the reference LM loaded by llama-cpp-python and
   compared with transformers on the same held-out tokens (max logit difference, mean per-token KL,
   llama.cpp perplexity), and of MiniLM (cosine of pooled embeddings on held-out paragraphs).

    python benchmarks/gguf_export.py --speed --verify --llama-src /path/to/llama_cpp_python-0.3.36
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS in MB of ``cmd`` (its own process).

    The peak comes from /usr/bin/time when it exists: the resource usage of a child forked from this
    process also counts the pages it shared with us before exec, so wait4 alone reports at least our
    own size.
    """
    timer = ["/usr/bin/time", "-f", "PEAK_KB %M"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(timer + cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    peaks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("PEAK_KB ")]
    return {"seconds": seconds, "peak_mb": (peaks[-1] if peaks else usage.ru_maxrss) / 1024}


def model_path(name: str) -> Path:
    if name == "minilm":
        from compress.files import default_model_path

        return default_model_path()
    sys.path.insert(0, str(HERE))
    from reference_lm import ensure_reference_lm

    return ensure_reference_lm()


def speed(model: Path, llama_src: Path, repeats: int, work: Path) -> list[dict]:
    converter = llama_src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    peer_env = {"PYTHONPATH": str(converter.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    rows = []
    for export_type in ("f16", "q8_0"):
        ours, theirs = [], []
        for _ in range(repeats):
            out = work / f"ours-{export_type}.gguf"
            ours.append(measured([sys.executable, "-m", "compress", "export", "gguf", "--model", str(model), "--out",
                                  str(out), "--type", export_type, "--overwrite"]))
            peer_out = work / f"peer-{export_type}.gguf"
            theirs.append(measured([sys.executable, str(converter), str(model), "--outtype", export_type,
                                    "--outfile", str(peer_out)], env=peer_env))
        row = {"type": export_type,
               "ours_s": statistics.median(r["seconds"] for r in ours),
               "peer_s": statistics.median(r["seconds"] for r in theirs),
               "ours_peak_mb": max(r["peak_mb"] for r in ours), "peer_peak_mb": max(r["peak_mb"] for r in theirs),
               "ours_mb": out.stat().st_size / 1e6, "peer_mb": peer_out.stat().st_size / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


class HeldOut:
    """Held-out token windows of the reference LM and transformers' float32 logits on them."""

    def __init__(self, model: Path, tokens: int, window: int):
        from transformers import AutoTokenizer

        from compress.data import load_texts, token_stream
        from compress.gguf import verify

        tok = AutoTokenizer.from_pretrained(str(model))
        ids = token_stream(load_texts("builtin", "heldout"), tok, tokens).tolist()
        self.window = window
        self.windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
        self.reference = verify.transformers_logits(model, self.windows)
        self.ppl = _ppl(self.reference, self.windows)

    def score(self, path: Path) -> dict:
        """max |logit difference|, mean KL and perplexity of the GGUF file in llama.cpp."""
        import numpy as np

        from compress.gguf import verify

        llm = verify.open_model(path, n_ctx=self.window)
        got = [verify.causal_logits(llm, w) for w in self.windows]
        return {"max_logit_diff": max(float(np.abs(a - b).max()) for a, b in zip(self.reference, got)),
                "kl": float(np.mean([verify.mean_kl(a, b) for a, b in zip(self.reference, got)])),
                "ppl": _ppl(got, self.windows), "ppl_transformers": self.ppl}


def verify_lm(model: Path, types: list[str], held: HeldOut, work: Path) -> list[dict]:
    from compress.gguf.writer import export_gguf

    rows = []
    for export_type in types:
        path = work / f"lm-{export_type}.gguf"
        report = export_gguf(model, path, export_type, overwrite=True)
        row = {"model": "reference-lm", "type": export_type, "mb": report.file_bytes / 1e6,
               "bpw": report.bits_per_weight, "fallbacks": len(report.fallbacks), **held.score(path)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.unlink()
    return rows


def calibrated(model: Path, checkpoints: list[tuple[str, Path]], held: HeldOut, imatrix_samples: int,
               work: Path) -> list[dict]:
    """Plain against calibrated 4-bit files of the same size: GPTQ carried into Q4_0/Q4_1, imatrix k-quants.

    checkpoints: (label, GPTQ g32 folder); a symmetric one is carried into Q4_0 and Q4_1, an
    asymmetric one into Q4_1. imatrix_samples 0 leaves out the importance-matrix rows.
    """
    from compress.gguf.calibrated import gptq_blocks, importance_matrix
    from compress.gguf.writer import export_gguf

    variants = []
    for export_type in ("q4_0", "q4_1"):
        variants.append((export_type, "plain", {}))
        for label, folder in checkpoints:
            sym = json.loads((folder / "config.json").read_text())["quantization_config"]["sym"]
            if sym or export_type == "q4_1":
                variants.append((export_type, f"gptq {label}", {"replace": gptq_blocks(model, folder, export_type)}))
    imatrix_s = None
    if imatrix_samples:
        start = time.perf_counter()
        imatrix = importance_matrix(model, "builtin", nsamples=imatrix_samples, seqlen=256)
        imatrix_s = time.perf_counter() - start
        variants += [("q4_k", "plain", {}), ("q4_k", "imatrix", {"importance": imatrix}),
                     ("q4_k_m", "plain", {}), ("q4_k_m", "imatrix", {"importance": imatrix})]
    rows = []
    for export_type, how, extra in variants:
        path = work / "cal.gguf"
        report = export_gguf(model, path, export_type, overwrite=True, **extra)
        row = {"type": export_type, "how": how, "bytes": report.file_bytes, "bpw": report.bits_per_weight,
               "imatrix_s": imatrix_s if how == "imatrix" else None, **held.score(path)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.unlink()
    return rows


def versus_llama_quantize(model: Path, held: HeldOut, work: Path) -> list[dict]:
    """Our k-quant files against llama.cpp's llama-quantize run on our f32 export (same tensors, same mix)."""
    from compress.gguf import verify
    from compress.gguf.writer import export_gguf

    f32 = work / "f32.gguf"
    export_gguf(model, f32, "f32", overwrite=True)
    ftypes = {"q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
              "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
    rows = []
    for export_type, ftype in ftypes.items():
        ours, theirs = work / "ours.gguf", work / "theirs.gguf"
        export_gguf(model, ours, export_type, overwrite=True)
        verify.llama_quantize(f32, theirs, ftype)
        a, b = held.score(ours), held.score(theirs)
        row = {"type": export_type, "ours_bytes": ours.stat().st_size, "theirs_bytes": theirs.stat().st_size,
               "ours_kl": a["kl"], "theirs_kl": b["kl"], "ours_ppl": a["ppl"], "theirs_ppl": b["ppl"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _ppl(logits: list, windows: list[list[int]]) -> float:
    import numpy as np

    from compress.gguf.verify import log_softmax

    nll, n = 0.0, 0
    for lg, w in zip(logits, windows):
        lp = log_softmax(lg)
        nll -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    return float(np.exp(nll / n))


def verify_embeddings(model: Path, types: list[str], samples: int, work: Path) -> list[dict]:
    from compress.data import load_texts, paragraphs
    from compress.gguf import verify
    from compress.gguf.writer import export_gguf

    texts = [t[:400] for t in paragraphs(load_texts("builtin", "heldout"))[:samples]]
    reference = verify.transformers_embeddings(model, texts, pooling=1)
    rows = []
    for export_type in types:
        path = work / f"minilm-{export_type}.gguf"
        report = export_gguf(model, path, export_type, overwrite=True)
        got = verify.pooled_embeddings(verify.open_model(path, embedding=True), texts)
        cos = verify.cosine(reference, got)
        row = {"model": "all-MiniLM-L6-v2", "type": export_type, "mb": report.file_bytes / 1e6,
               "bpw": report.bits_per_weight, "export_s": report.seconds, "cos_mean": float(cos.mean()),
               "cos_min": float(cos.min()), "fallbacks": len(report.fallbacks)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.unlink()
    return rows


def main() -> None:
    from compress.gguf.writer import TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speed", action="store_true")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--llama-src", type=Path, help="unpacked llama-cpp-python source distribution (for the peer)")
    p.add_argument("--speed-model", default="minilm", help="minilm (the peer refuses the reference LM's tokenizer)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored per type")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--samples", type=int, default=64, help="held-out paragraphs for MiniLM")
    p.add_argument("--calibrated", action="store_true", help="plain vs GPTQ-carried and imatrix 4-bit files")
    p.add_argument("--gptq", action="append", default=[], metavar="LABEL=PATH",
                   help="a GPTQ --bits 4 --group-size 32 checkpoint of the reference LM (repeatable)")
    p.add_argument("--imatrix-samples", type=int, default=128, help="calibration samples of 256 tokens (0: no imatrix rows)")
    p.add_argument("--vs-llama-quantize", action="store_true", help="our k-quants against llama-quantize's")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    print("uptime:", os.getloadavg(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.speed:
            if args.llama_src is None:
                raise SystemExit("--speed needs --llama-src (the unpacked llama-cpp-python sdist)")
            results["speed"] = speed(model_path(args.speed_model), args.llama_src, args.repeats, work)
        held = HeldOut(model_path("reference-lm"), args.tokens, args.window) if args.verify or args.calibrated or args.vs_llama_quantize else None
        if args.verify:
            types = args.types.split(",")
            results["lm"] = verify_lm(model_path("reference-lm"), types, held, work)
            results["minilm"] = verify_embeddings(model_path("minilm"), types, args.samples, work)
        if args.vs_llama_quantize:
            results["vs_llama_quantize"] = versus_llama_quantize(model_path("reference-lm"), held, work)
        if args.calibrated:
            if not args.gptq or not all("=" in g for g in args.gptq):
                raise SystemExit("--calibrated needs --gptq LABEL=PATH checkpoints of the reference LM")
            checkpoints = [(g.split("=", 1)[0], Path(g.split("=", 1)[1])) for g in args.gptq]
            results["calibrated"] = calibrated(model_path("reference-lm"), checkpoints, held, args.imatrix_samples, work)
    print("uptime:", os.getloadavg(), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
