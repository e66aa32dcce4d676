"""What tests/test_fuzz_cli.py draws: damaged model folders, flag values and output paths.

An Example is one command line with placeholders (@IN the input model, @OUT the output, @S the
scratch folder, @A the folder of shared read-only models) and what to do to the scratch folder first;
the strategies at the end draw them.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import tiny
from hypothesis import strategies as st

CPU = ["--device", "cpu"]
NO_EVAL = ["--no-eval", *CPU]
# the closing table on a tiny budget (about a second a model)
QUICK = ["--no-latency", "--eval-tokens", "64", "--eval-samples", "4", "--eval-seqlen", "16", "--repeats", "1", *CPU]
TRAIN = ["--steps", "1", "--batch-size", "2", "--max-length", "16", "--max-samples", "4", "--no-train-eval"]


@dataclass
class Example:
    """One command on one scratch folder. In argv, @IN is the input model, @OUT the output, @S the
    scratch folder and @A the folder of shared (read-only) models."""

    arch: str
    argv: list[str]
    setup: tuple = ()              # (step, value) pairs applied to the scratch folder before the run
    out: str | None = None         # kind of --out (see make_out), None when the command has none
    suffix: str = ""               # what the output's name must end with (.gguf)
    overwrite: bool = False
    check: str | None = None       # what a success must have written: model, gguf, report, exists
    side: tuple = ()               # --json / --plot target kinds drawn (see SIDE_TARGETS)
    must_refuse: str | None = None
    must_succeed: bool = False



# ---------------------------------------------------------------------------------------------- scratch

def write_data_files(data: Path) -> None:
    """Calibration and training sources, good and bad, in ``data``."""
    data.mkdir()
    (data / "text.txt").write_text("\n".join(tiny._TEXT[:40]) + "\n")
    (data / "empty.txt").write_text("")
    (data / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (data / "text.xyz").write_text("some text\n")
    (data / "rows.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in tiny._TEXT[:20]) + "\n")
    (data / "rows.csv").write_text("body\n" + "\n".join(tiny._TEXT[:20]) + "\n")
    (data / "labeled.csv").write_text("text,label\n" + "\n".join(f"\"{t}\",{i % 3}" for i, t in enumerate(tiny._TEXT[:30])))
    (data / "map.json").write_text("[1, 2, \"x\"]")
    os.mkfifo(data / "fifo")


def damage_config(folder: Path, how: tuple) -> None:
    path = folder / "config.json"
    kind, value = how
    if kind == "whole":
        if value == "missing":
            path.unlink()
        elif value == "folder":
            path.unlink()
            path.mkdir()
        elif value == "fifo":
            path.unlink()
            os.mkfifo(path)
        else:
            path.write_bytes(value)
        return
    config = json.loads(path.read_text())
    if kind == "remove":
        config.pop(value, None)
    elif kind == "set":
        config.update(value)
    path.write_text(json.dumps(config))


def damage_checkpoint(folder: Path, how: tuple) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    kind, pick = how
    if kind in ("truncate", "garbage", "empty", "header-huge", "missing", "pickle"):
        raw = path.read_bytes()
        path.unlink()
        if kind == "truncate":
            path.write_bytes(raw[: 8 + pick % (len(raw) - 8)])
        elif kind == "garbage":
            path.write_bytes(b"\x89not a safetensors file" * 10)
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "header-huge":
            path.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
        elif kind == "pickle":  # weights in a pickle that torch.load(weights_only=True) refuses
            torch.save({"lm_head.weight": torch.zeros(2, 2), "path": Path("x")}, folder / "pytorch_model.bin")
        return
    tensors = load_file(str(path))
    names = sorted(tensors)
    name = names[pick % len(names)]
    t = tensors[name]
    if kind == "remove":
        del tensors[name]
    elif kind == "reshape":
        tensors[name] = t.reshape(-1)[: max(t.numel() - 1, 1)].clone() if t.dim() == 1 else t[:-1].clone()
    elif kind == "transpose":
        tensors[name] = t.t().contiguous() if t.dim() == 2 else t.reshape(1, -1).clone()
    elif kind == "int":
        tensors[name] = t.to(torch.int32)
    elif kind == "int-all":
        tensors = {k: v.to(torch.int8) for k, v in tensors.items()}
    elif kind == "bool":
        tensors[name] = t > 0
    elif kind == "float64":
        tensors[name] = t.to(torch.float64)
    elif kind == "nan":
        tensors[name] = torch.full_like(t, float("nan"))
    elif kind == "extra":
        tensors["extra.weight"] = torch.zeros(3, 5)
    save_file(tensors, str(path), metadata={"format": "pt"})


def make_out(kind: str, scratch: Path, inp: Path, build_previous, suffix: str = "") -> str:
    """Create what an output path of ``kind`` needs and return the path to pass as --out."""
    target = scratch / f"result{suffix}"
    if kind == "new":
        return str(target)
    if kind == "nested":
        return str(scratch / "a" / "b" / f"result{suffix}")
    if kind == "empty-dir":
        target.mkdir()
    elif kind == "foreign-dir":
        target.mkdir()
        (target / "notes.txt").write_text("mine\n")
    elif kind == "foreign-file":
        target.write_text("my notes\n")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "chardev":  # a /dev/null of our own: the same device numbers, inside the scratch folder
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "previous":
        build_previous(target)
    elif kind in ("link-input", "link-foreign", "link-dangling"):
        dest = {"link-input": inp, "link-foreign": scratch / "foreign", "link-dangling": scratch / "nowhere"}[kind]
        if kind == "link-foreign":
            dest.mkdir()
            (dest / "notes.txt").write_text("mine\n")
        target.symlink_to(dest)
    elif kind == "parent-is-file":
        (scratch / "afile").write_text("a file\n")
        return str(scratch / "afile" / f"result{suffix}")
    elif kind == "too-long":
        return str(scratch / ("x" * 300 + suffix))
    elif kind == "omitted":
        return None
    else:
        return {"input": str(inp), "input-slash": f"{inp}/", "dotdot-input": str(scratch / "work" / ".." / "in" / "model"),
                "parent": str(inp.parent), "scratch": str(scratch), "inside": str(inp / "sub"), "cwd": ".",
                "empty-string": ""}[kind]
    return str(target)


# out kinds that must be refused whatever the flags: they are, hold or sit inside something not ours
REFUSED_OUT = {"input": "--out is the input folder", "input-slash": "--out is the input folder",
               "dotdot-input": "--out is the input folder", "parent": "--out is a parent of the input",
               "scratch": "--out is an ancestor of the input", "inside": "--out is inside the input",
               "cwd": "--out is the working folder",
               "foreign-dir": "--out is a folder compress did not make", "foreign-file": "--out is a file compress did not make",
               "fifo": "--out is a FIFO", "chardev": "--out is a device", "parent-is-file": "the parent of --out is a file",
               "too-long": "--out has a name too long for the file system"}
EXISTING_OUT = {"empty-dir", "foreign-dir", "foreign-file", "fifo", "chardev", "previous", "link-input", "link-foreign",
                "input", "input-slash", "dotdot-input", "parent", "scratch", "cwd"}
SIDE_TARGETS = {"new": "@S/r.{ext}", "nested": "@S/x/y/r.{ext}", "dir": "@S/data", "input-config": "@IN/config.json",
                "input-dir": "@IN", "fifo": "@S/data/fifo", "foreign": "@S/data/text.txt",
                "parent-is-file": "@S/data/text.txt/r.{ext}", "bad-ext": "@S/r.xyz", "no-ext": "@S/r"}


# ---------------------------------------------------------------------------------------------- strategies

FLAG = "<flag>"
# values argparse accepts but the command must refuse (values argparse refuses are drawn for a few flags only,
# or nearly every example would stop at the parser)
INT_BAD = ["0", "-1", str(2**64)]
FLOAT_BAD = ["0", "-1", "nan", "inf", "-inf", "1e999"]
UNPARSABLE = ["abc", "", "1e3", "0x10"]
DATA_SOURCES = ["builtin", "@S/data/text.txt", "@S/data/empty.txt", "@S/data/binary.bin", "@S/data/fifo", "/dev/zero",
                "@S/missing.txt", "@S/data", "@S/data/rows.jsonl", "@S/data/rows.csv", "@S/data/text.xyz",
                "hf:nonexistent/nothing"]

QUANTIZE_FLAGS = [
    ("--method", ["rtn", "gptq", "nf4", "awq", "RTN", ""]),
    ("--bits", ["2", "3", "8", "1", "5", "16", *INT_BAD, *UNPARSABLE]),
    ("--group-size", ["64", "-1", "128", "7", "48", "100000", *INT_BAD]),
    ("--asym", [FLAG]), ("--sym", [FLAG]), ("--act-order", [FLAG]), ("--static-groups", [FLAG]), ("--mse", [FLAG]),
    ("--no-true-sequential", [FLAG]), ("--offload", [FLAG]),
    ("--damp", ["0.1", "1", "2", *FLOAT_BAD, *UNPARSABLE]),
    ("--nsamples", ["1", "3", *INT_BAD]),
    ("--seqlen", ["8", "2", "1", "256", "257", "100000", *INT_BAD]),
    ("--calib-batch-size", ["1", "3", *INT_BAD]),
    ("--seed", ["1", "-1", str(2**64)]),
    ("--calib", DATA_SOURCES),
    ("--skip", [".*", "(", "q_proj", "query", ""]),
    ("--override", ["q_proj=bits:8", "query=bits:8", "(=bits:8", ".*=bits:0", "x=bits:99", ".*=group_size:7", "=bits:4",
                    "q_proj=bits:-3", ".*=bits:8,group_size:-1", "q_proj", "q_proj=depth:3"]),
    ("--blocks", ["model.layers", "bert.encoder.layer", "nope", "model", "", "model.layers.0"]),
    ("--dtype", ["float16", "bfloat16", "float32", "int8"]),
    ("--quant-type", ["fp4", "nf4", "int4"]), ("--double-quant", [FLAG]), ("--no-double-quant", [FLAG]),
    ("--blocksize", ["32", "128", "4096", "8192", "48", "3", *INT_BAD]),
    ("--compute-dtype", ["bfloat16", "float16", "int8"]),
    ("--device", ["cuda", "auto", "tpu"]),
]
EVAL_FLAGS = [
    ("--eval-tokens", ["32", *INT_BAD]), ("--eval-samples", ["2", *INT_BAD]),
    ("--eval-seqlen", ["8", "1", "257", "100000", *INT_BAD]), ("--repeats", ["2", *INT_BAD]),
    ("--eval-data", DATA_SOURCES), ("--labeled", ["@S/data/labeled.csv", "@S/missing.csv", "@S/data/fifo", "@S/data/text.txt"]),
    ("--text-field", ["body", "nope", ""]), ("--label-field", ["nope"]), ("--no-latency", [FLAG]),
]
PRUNE_FLAGS = [
    ("--method", ["magnitude", "wanda", "sparsegpt", "obs"]),
    ("--sparsity", ["0.25", "0.9", "0", "1", "1.5", "-0.1", "nan", "inf", "abc", ""]),
    ("--pattern", ["2:4", "4:8", "1:4", "0:4", "5:4", "2:0", "a:b", "2:4:8", "4:4", ""]),
    ("--scope", ["global", "layer", "model"]), ("--storage", ["dense", "sparse"]),
    ("--structured", ["heads=0.5,ffn=0.5", "heads=0.25", "ffn=0.5", "heads=1", "heads=2", "ffn=-1", "heads=nan", "x",
                      "heads=0.5,heads=0.25", "", "ffn=0.99"]),
    ("--importance", ["activation", "taylor", "weight"]),
    ("--skip", [".*", "(", "q_proj"]),
    ("--override", ["q_proj=sparsity:0.9", "query=sparsity:0.9", "(=sparsity:0.5", ".*=pattern:2:4", "x=sparsity:nan",
                    "q_proj=sparsity:2", "q_proj=bits:4", "q_proj"]),
    ("--blocks", ["nope", "model.layers", ""]),
    ("--calib", DATA_SOURCES), ("--nsamples", ["1", *INT_BAD]), ("--seqlen", ["8", "1", "257", *INT_BAD]),
    ("--calib-batch-size", ["1", *INT_BAD]), ("--damp", ["0.1", *FLOAT_BAD]), ("--seed", ["1", "-1", str(2**64)]),
    ("--schedule", ["cubic", "iterative", "oneshot"]), ("--rounds", ["1", "2", "0", "-1"]),
    ("--retrain", [FLAG, FLAG]), ("--data", ["builtin", "@S/missing.txt", "@S/data/empty.txt", "@S/data/text.txt", "@S/data/fifo"]),
    ("--distill", [FLAG]), ("--steps", ["2", "0", "-1"]), ("--lr", ["1e-3", *FLOAT_BAD]),
    ("--batch-size", ["1", "0", "-1"]), ("--max-length", ["8", "1", "0", "-1", "100000"]),
]
EXPORT_FLAGS = [
    ("--type", ["f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q6_k", "q4_k_m", "q3", "F16", ""]),
    ("--from-gptq", ["@A/llama-gptq", "@A/llama-seed1-gptq", "@A/bert-gptq", "@IN", "@S/missing", "@S/data/text.txt"]),
    ("--imatrix", DATA_SOURCES), ("--nsamples", ["2", *INT_BAD]), ("--seqlen", ["16", "1", "257", *INT_BAD]),
]
TRAINING_FLAGS = [
    ("--lr", ["1e-3", *FLOAT_BAD]), ("--batch-size", ["1", "0", "-1"]), ("--grad-accum", ["2", "0", "-1"]),
    ("--warmup-ratio", ["0", "1", "2", "-1", "nan"]), ("--weight-decay", ["0", "-1", "nan"]),
    ("--max-length", ["8", "1", "0", "-1", "100000"]), ("--save-steps", ["1", "0", "-1"]), ("--logging-steps", ["0", "-1"]),
    ("--precision", ["bf16", "fp16"]), ("--resume", [FLAG]), ("--epochs", ["1", "0", "-1", "nan"]),
    ("--checkpoints", ["@IN", "@S/ckpt", "@OUT", "@S/data/text.txt"]), ("--keep-checkpoints", [FLAG]),
    ("--max-samples", ["0", "-1", "1"]), ("--seed", ["-1", str(2**64)]), ("--steps", ["2", "0", "-1"]),
]
DISTILL_FLAGS = TRAINING_FLAGS + [
    ("--temperature", ["1", *FLOAT_BAD, *UNPARSABLE]), ("--alpha", ["0", "1", "-1", "2", "nan"]),
    ("--hidden-loss", [FLAG, "1", "nan", "-1"]), ("--attn-loss", [FLAG, "inf"]), ("--cosine-loss", [FLAG, "-2"]),
    ("--student-layers", ["2", "0", "-1", "3", "100"]),
    ("--layer-indices", ["0", "1,0", "0,0", "5", "a", "-1", ""]),
    ("--student-hidden", ["32", "0", "-1", "33", "128"]), ("--student-intermediate", ["40", "0", "-1", "1000"]),
    ("--layer-map", ["0:0,1:2", "a:b", "9:9", "1:1"]), ("--task", ["classify", "mlm", "causal", "embed"]),
    ("--mlm-probability", ["0", "1", "2", "nan"]), ("--embed-loss", ["cosine"]),
    ("--similarity-temperature", ["0", "nan", "-1"]),
    ("--student", ["@IN", "@A/bert", "@A/llama-gptq", "@S/missing"]),
    ("--vocab-map", ["@S/missing.json", "@S/data/text.txt", "@S/data/map.json"]),
    ("--data", ["builtin", "demo", "@S/missing.txt", "@S/data/empty.txt", "@S/data/labeled.csv", "@S/data/fifo"]),
    ("--transfer-data", ["demo", "builtin", "@S/missing.txt"]),
]
QAT_FLAGS = TRAINING_FLAGS + [
    ("--method", ["nf4", "int", "fp8"]), ("--bits", ["2", "3", "8", "5", "0", "-1"]), ("--group-size", ["64", "-1", "7", "0"]),
    ("--learnable-scales", [FLAG]), ("--act-bits", ["8", "4"]), ("--blocksize", ["32", "0", "3", "-1"]),
    ("--quantize-head", [FLAG]), ("--warmup-steps", ["1", "-1", "1000"]), ("--freeze-at", ["0", "0.5", "2", "-1", "nan"]),
    ("--distill", [FLAG]), ("--temperature", ["nan", "0"]), ("--alpha", ["2", "nan"]), ("--hidden-loss", [FLAG]),
    ("--transfer-data", ["demo", "builtin"]), ("--lora", [FLAG, FLAG]), ("--lora-rank", ["1", "0", "-1", "1000"]),
    ("--lora-alpha", ["0", "nan", "-1"]), ("--merge", [FLAG]), ("--teacher", ["@IN", "@A/bert", "@S/missing"]),
    ("--data", ["@S/missing.txt", "@S/data/empty.txt", "demo", "@S/data/text.txt"]),
]
FINETUNE_FLAGS = TRAINING_FLAGS + [
    ("--data", ["demo", "@S/missing.csv", "@S/data/text.txt", "@S/data/labeled.csv", "builtin", "@S/data/fifo"]),
    ("--labeled", ["@S/data/labeled.csv", "@S/missing.csv"]), ("--label-field", ["nope"]), ("--text-field", ["nope"]),
]
EVAL_MODELS = ["@A/bert", "@A/llama", "@A/llama-gptq", "@S/missing", "@S/data/text.txt", "@S", "@IN"]

# command -> (argv before the drawn flags, what a success writes, flags drawn, relative cost)
COMMANDS = {
    "rtn": (["quantize", "--method", "rtn", "--group-size", "32", "--model", "@IN", "--out", "@OUT", *NO_EVAL], "model", QUANTIZE_FLAGS, 4),
    "gptq": (["quantize", "--method", "gptq", "--group-size", "32", "--nsamples", "2", "--seqlen", "16",
              "--model", "@IN", "--out", "@OUT", *NO_EVAL], "model", QUANTIZE_FLAGS, 4),
    "nf4": (["quantize", "--method", "nf4", "--model", "@IN", "--out", "@OUT", *NO_EVAL], "model", QUANTIZE_FLAGS, 3),
    "prune": (["prune", "--nsamples", "2", "--seqlen", "16", "--steps", "1", "--batch-size", "2", "--max-length", "16",
               "--model", "@IN", "--out", "@OUT", *NO_EVAL], "model", PRUNE_FLAGS, 4),
    "structured": (["prune", "--structured", "heads=0.5,ffn=0.5", "--nsamples", "2", "--seqlen", "16", "--model", "@IN",
                    "--out", "@OUT", *NO_EVAL], "model",
                   PRUNE_FLAGS, 1),
    "gguf": (["export", "gguf", "--type", "q8_0", "--nsamples", "2", "--seqlen", "16", "--model", "@IN", "--out", "@OUT"],
             "gguf", EXPORT_FLAGS, 3),
    "eval": (["eval", "--model", "@IN", *QUICK], None, EVAL_FLAGS, 1),
    "distill": (["distill", *TRAIN, "--student-layers", "1", "--model", "@IN", "--out", "@OUT", *NO_EVAL], "model",
                DISTILL_FLAGS, 1),
    "qat": (["qat", *TRAIN, "--group-size", "32", "--data", "builtin", "--model", "@IN", "--out", "@OUT", *NO_EVAL],
            "exists", QAT_FLAGS, 1),
    "finetune": (["finetune", *TRAIN, "--data", "demo", "--model", "@IN", "--out", "@OUT", *NO_EVAL], "model",
                 FINETUNE_FLAGS, 1),
}


def weighted(names: list[str], weight) -> st.SearchStrategy:
    return st.sampled_from([n for n in names for _ in range(weight(n))])


def draw_flags(draw, table) -> list[str]:
    """Up to six flags of ``table``, each with a value drawn from its list."""
    argv = []
    for i in draw(st.lists(st.integers(0, len(table) - 1), max_size=6, unique=True)):
        flag, values = table[i]
        value = draw(st.sampled_from(values))
        argv += [flag] if value == FLAG else [flag, value]
    return argv


CONFIG_BAD_VALUES = ["abc", None, 1.5, 2**62, 10**30, -1, 0, [1, 2], {"a": 1}, True, float("nan"), float("inf"), ""]
CONFIG_KEYS = {
    "llama": ["model_type", "architectures", "hidden_size", "num_attention_heads", "num_hidden_layers",
              "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim",
              "rms_norm_eps", "tie_word_embeddings", "dtype", "rope_parameters", "hidden_act", "quantization_config"],
    "bert": ["model_type", "architectures", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
             "vocab_size", "max_position_embeddings", "layer_norm_eps", "type_vocab_size", "hidden_act", "dtype",
             "quantization_config"],
}
GEOMETRY = {
    "llama": [{"hidden_size": 66}, {"num_attention_heads": 3}, {"num_hidden_layers": -2}, {"num_hidden_layers": 3},
              {"num_hidden_layers": 1}, {"num_key_value_heads": 3}, {"intermediate_size": 81}, {"vocab_size": 10},
              {"head_dim": 7}, {"hidden_size": 128}, {"max_position_embeddings": 4}, {"num_hidden_layers": 2**40},
              {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}},
              {"quantization_config": {"quant_method": "awq"}}, {"model_type": "bert"}],
    "bert": [{"hidden_size": 66}, {"num_attention_heads": 5}, {"num_hidden_layers": -1}, {"num_hidden_layers": 3},
             {"intermediate_size": 81}, {"vocab_size": 10}, {"type_vocab_size": 0}, {"max_position_embeddings": 4},
             {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, {"model_type": "llama"}],
}
CONFIG_WHOLE = [b"[1, 2]", b'"llama"', b"42", b"null", b"", b'{"model_type": "lla', b"\xff\xfe\x00\x81garbage", b"NaN",
                "missing", "folder", "fifo"]
CHECKPOINT_DAMAGE = ["remove", "reshape", "transpose", "int", "int-all", "bool", "float64", "nan", "extra", "truncate",
                     "garbage", "empty", "header-huge", "missing", "pickle"]
FILE_COMMANDS = ["rtn", "gptq", "nf4", "prune", "structured", "gguf", "eval", "distill", "load"]
FILE_WEIGHT = {"rtn": 4, "gptq": 3, "nf4": 3, "prune": 3, "structured": 1, "gguf": 4, "eval": 1, "distill": 1, "load": 4}


@st.composite
def damaged_model_examples(draw) -> Example:
    arch = draw(st.sampled_from(["llama", "bert"]))
    what = draw(st.sampled_from(["whole", "remove", "set", "geometry", "checkpoint", "checkpoint"]))
    if what == "whole":
        damage = ("config", ("whole", draw(st.sampled_from(CONFIG_WHOLE))))
    elif what == "remove":
        damage = ("config", ("remove", draw(st.sampled_from(CONFIG_KEYS[arch]))))
    elif what == "set":
        key = draw(st.sampled_from(CONFIG_KEYS[arch]))
        damage = ("config", ("set", {key: draw(st.sampled_from(CONFIG_BAD_VALUES))}))
    elif what == "geometry":
        damage = ("config", ("set", draw(st.sampled_from(GEOMETRY[arch]))))
    else:
        damage = ("checkpoint", (draw(st.sampled_from(CHECKPOINT_DAMAGE)), draw(st.integers(0, 10**6))))
    name = draw(weighted(FILE_COMMANDS, FILE_WEIGHT.get))
    if name == "load":
        return Example(arch, ["load", "@IN"], (damage,), check=None)
    argv, check_kind, _, _ = COMMANDS[name]
    if name == "prune":
        argv = argv + ["--method", draw(st.sampled_from(["magnitude", "wanda", "sparsegpt"]))]
    return Example(arch, argv, (damage,), out="new" if "@OUT" in argv else None, check=check_kind,
                   suffix=".gguf" if name == "gguf" else "")


@st.composite
def flag_examples(draw) -> Example:
    name = draw(weighted(list(COMMANDS), lambda n: COMMANDS[n][3]))
    argv, check_kind, table, _ = COMMANDS[name]
    arch = "bert" if name == "finetune" else draw(st.sampled_from(["llama", "bert"]))
    argv = argv + draw_flags(draw, table)
    if name == "eval":
        argv += ["--model", draw(st.sampled_from(EVAL_MODELS))] if draw(st.booleans()) else []
    elif name in ("rtn", "nf4", "prune") and draw(st.integers(0, 11)) == 0:  # the closing table, odd evaluation flags
        argv = [a for a in argv if a != "--no-eval"] + QUICK + draw_flags(draw, EVAL_FLAGS)
    return Example(arch, argv, out="new" if "@OUT" in argv else None, check=check_kind,
                   suffix=".gguf" if name == "gguf" else "")


# commands whose flags are all valid: the output path alone decides
PATH_COMMANDS = {
    "rtn": COMMANDS["rtn"][0], "nf4": COMMANDS["nf4"][0],
    "magnitude": ["prune", "--method", "magnitude", "--model", "@IN", "--out", "@OUT", *NO_EVAL],
    "structured": ["prune", "--structured", "heads=0.5", "--model", "@IN", "--out", "@OUT", *NO_EVAL],
    "structured+sparsity": ["prune", "--structured", "heads=0.5", "--sparsity", "0.5", "--model", "@IN", "--out", "@OUT", *NO_EVAL],
    "gguf": ["export", "gguf", "--type", "f16", "--model", "@IN", "--out", "@OUT"],
    "eval": ["eval", "--model", "@IN", "--out", "@OUT", *QUICK],
    "rtn+eval": ["quantize", "--method", "rtn", "--group-size", "32", "--model", "@IN", "--out", "@OUT", *QUICK],
    "distill": COMMANDS["distill"][0], "lora": ["qat", "--lora", *TRAIN, "--data", "builtin", "--model", "@IN", "--out", "@OUT", *NO_EVAL],
}
PATH_WEIGHT = {"rtn": 5, "nf4": 2, "magnitude": 3, "structured": 2, "structured+sparsity": 1, "gguf": 5, "eval": 2,
               "rtn+eval": 2, "distill": 1, "lora": 1}
PATH_CHECK = {"gguf": "gguf", "eval": "report", "lora": "exists"}
OUT_KINDS = ["new", "nested", "empty-dir", "foreign-dir", "foreign-file", "fifo", "previous", "previous", "link-input",
             "link-foreign", "link-dangling", "parent-is-file", "too-long", "input", "input-slash", "dotdot-input",
             "parent", "scratch", "inside", "cwd", "empty-string", "omitted"] + (["chardev"] if os.geteuid() == 0 else [])


@st.composite
def output_path_examples(draw) -> Example:
    name = draw(weighted(list(PATH_COMMANDS), PATH_WEIGHT.get))
    arch = draw(st.sampled_from(["llama", "bert"]))
    kind = draw(st.sampled_from(OUT_KINDS))
    overwrite = draw(st.booleans())
    side = ()
    if name in ("eval", "rtn+eval"):
        side = tuple((flag, draw(st.sampled_from(list(SIDE_TARGETS)))) for flag in ("--json", "--plot") if draw(st.booleans()))
    if name == "eval":  # its --out is a report folder it always replaces (it has no --overwrite)
        overwrite = True
    refuse = REFUSED_OUT.get(kind) or (f"--out ({kind}) exists and --overwrite is not given"
                                       if kind in EXISTING_OUT - {"empty-dir"} and not overwrite else None)
    succeed = not side and (kind in ("new", "nested") or kind == "previous" and overwrite)
    return Example(arch, PATH_COMMANDS[name], out=kind, overwrite=overwrite, check=PATH_CHECK.get(name, "model"),
                   suffix=".gguf" if name == "gguf" else "", side=side, must_refuse=refuse, must_succeed=succeed)


# inputs that failed once, run before the drawn ones on every run
PINNED_DAMAGED = [
    Example("llama", COMMANDS["rtn"][0], (("config", ("set", {"num_hidden_layers": 2**40})),), out="new", check="model"),
    Example("bert", COMMANDS["rtn"][0], (("config", ("set", {"hidden_act": ""})),), out="new", check="model"),
    Example("llama", COMMANDS["gguf"][0], (("checkpoint", ("garbage", 0)),), out="new", check="gguf", suffix=".gguf"),
]
PINNED_FLAGS = [  # the closing table's data is read only after the output was written
    Example("llama", [a for a in COMMANDS["rtn"][0] if a != "--no-eval"] + QUICK + ["--eval-data", "/dev/zero"],
            out="new", check="model"),
]
