"""`compress quantize --method nf4` in a subprocess: the closing harness table, and every bad input
giving one sentence, exit code 2 and no output."""

import json
import re

import pytest
from safetensors.torch import load_file, save_file
from test_cli import QUICK, assert_clean_error, run

from compress.errors import CompressError


def test_nf4_quantize_prints_the_table_with_bits_per_weight(minilm, tmp_path):
    out = tmp_path / "nf4"
    proc = run("quantize", "--method", "nf4", "--model", minilm, "--out", out, "--device", "cpu",
               "--json", tmp_path / "r.json", "--no-latency", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "quantized 36 layers" in proc.stdout and "with nf4-b64-dq" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("model"))
    assert "bits/w" in header and "cosine" in header
    row = json.loads((tmp_path / "r.json").read_text())["results"][1]
    assert row["quantization"] == "nf4 b64 dq" and round(row["bits_per_weight"], 3) == 4.127
    assert " 4.127 " in proc.stdout
    assert row["metrics"]["cosine"] > 0.9



def test_nf4_flags_reach_the_checkpoint(tiny_model, tmp_path, capsys):
    from compress.cli import main

    out = tmp_path / "fp4"
    assert main(["quantize", "--method", "nf4", "--quant-type", "fp4", "--no-double-quant", "--blocksize", "128",
                 "--compute-dtype", "bfloat16", "--model", str(tiny_model("llama")), "--out", str(out), "--no-eval"]) == 0
    stdout = capsys.readouterr().out
    assert "with fp4-b128 in" in stdout and not any(line.startswith("model") for line in stdout.splitlines())
    assert "bitsandbytes 0.50's CPU kernels mishandle 14 layers" in stdout  # every in_features (64, 80) < 128
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["bnb_4bit_quant_type"], qcfg["bnb_4bit_use_double_quant"], qcfg["bnb_4bit_compute_dtype"],
            qcfg["meta"]["blocksize"]) == ("fp4", False, "bfloat16", 128)
    import compress
    import torch

    layer = compress.load(out).model.get_submodule("model.layers.0.mlp.up_proj")
    assert (layer.quant_type, layer.blocksize, layer.double_quant, layer.compute_dtype) == ("fp4", 128, False, torch.bfloat16)


def test_flags_that_do_not_fit_the_method_are_refused():
    from compress.cli import build_parser
    from compress.commands.quantize import build_config

    cases = [
        (["--method", "nf4", "--bits", "3"], "--bits 3 does not apply"),
        (["--method", "nf4", "--group-size", "64"], "--group-size does not apply to --method nf4"),
        (["--method", "nf4", "--asym"], "--asym does not apply to --method nf4"),
        (["--method", "nf4", "--override", "mlp=bits:8"], "--override does not apply to --method nf4"),
        (["--method", "rtn", "--blocksize", "64"], "--blocksize applies to --method nf4 only"),
        (["--method", "rtn", "--no-double-quant"], "--double-quant/--no-double-quant applies to --method nf4 only"),
    ]
    for argv, message in cases:
        args = build_parser().parse_args(["quantize", *argv])
        with pytest.raises(CompressError, match=re.escape(message)):
            build_config(args)
    config = build_config(build_parser().parse_args(["quantize", "--method", "nf4", "--no-double-quant"]))
    assert (config.quant_type, config.double_quant, config.blocksize, config.compute_dtype) == ("nf4", False, 64, "float32")


def test_nf4_bad_inputs_one_sentence_exit_2_nothing_written(tiny_model, tmp_path, hash_tree, capsys):
    import compress
    from compress.cli import main
    from compress.config import NF4Config

    good = tiny_model("llama")
    broken = tmp_path / "broken"
    compress.quantize(good, broken, NF4Config(), progress=False)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    before, broken_hash = hash_tree(good), hash_tree(broken)
    out = tmp_path / "out"

    # the real command line: a block size that is not a power of two, and a checkpoint missing a quant_state key
    assert_clean_error(run("quantize", "--method", "nf4", "--model", good, "--out", out, "--blocksize", 100),
                       "--blocksize 100 is not supported", "power of two from 32 to 4096")
    assert_clean_error(run("eval", "--model", broken, "--no-latency", "--out", tmp_path / "report", *QUICK),
                       "layer model.layers.0.self_attn.q_proj",
                       "no model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4")
    # the same entry point in this process for the other cases
    for extra, fragment in ((["--blocksize", "16"], "--blocksize 16 is not supported"),
                            (["--blocksize", "8192"], "--blocksize 8192 is not supported"),
                            (["--quant-type", "int4"], "invalid choice: 'int4'")):
        try:
            code = main(["quantize", "--method", "nf4", "--model", str(good), "--out", str(out), *extra])
        except SystemExit as e:  # argparse rejects a bad choice itself
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not out.exists() and not (tmp_path / "report").exists()
    assert hash_tree(good) == before and hash_tree(broken) == broken_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"], "no temporary folders left"
