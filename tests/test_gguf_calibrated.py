"""Calibrated GGUF export: GPTQ groups carried into Q4_0/Q4_1 blocks, importance matrices for k-quants."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf", reason="the gguf package is needed for GGUF export (pip install 'compress[gguf]')")

import tiny  # noqa: E402
from compress.config import GPTQConfig, RTNConfig  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.gguf.arch import permute_rotary  # noqa: E402
from compress.gguf.calibrated import gptq_blocks, importance_matrix, unpack_cols, unpack_rows  # noqa: E402
from compress.gguf.writer import export_gguf  # noqa: E402
from compress.quant.apply import quantize  # noqa: E402


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Llama with 128-wide rows, so every layer splits into groups of 32."""
    import transformers

    path = tmp_path_factory.mktemp("cal") / "llama"
    path.mkdir()
    tok = tiny.train_bpe(path)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def gptq_dequant(folder, prefix, offset=1):
    t = load_file(folder / "model.safetensors")
    q = unpack_rows(t[f"{prefix}.qweight"]).float()  # [K, N]
    z = (unpack_cols(t[f"{prefix}.qzeros"]) + offset).float()  # [G, N]
    s = t[f"{prefix}.scales"].float()
    g = torch.arange(q.shape[0]) // 32
    return (s[g] * (q - z[g])).t().numpy()  # [N, K]


@pytest.mark.parametrize("sym,export_type", [(False, "q4_1"), (True, "q4_0")])
def test_gptq_groups_carried_exactly(wide_llama, tmp_path, sym, export_type):
    ckpt = tmp_path / "gptq"
    quantize(wide_llama, ckpt, RTNConfig(bits=4, group_size=32, sym=sym), device="cpu", progress=False)
    blocks = gptq_blocks(wide_llama, ckpt, export_type)
    assert len(blocks) == 14
    export_gguf(wide_llama, tmp_path / "m.gguf", export_type, replace=blocks)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    for layer, name, heads in [("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", None),
                               ("model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight", 4),
                               ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", 2)]:
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType[export_type.upper()]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        want = gptq_dequant(ckpt, layer)
        if heads:
            want = permute_rotary(want, heads)
        # codes and scales are identical; only Q4_1's offset m = -s*z is rounded to float16
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_gptq_refusals(wide_llama, tmp_path):
    ckpt = tmp_path / "g64"
    quantize(wide_llama, ckpt, RTNConfig(bits=4, group_size=64, sym=False), device="cpu", progress=False)
    with pytest.raises(CompressError, match="group size 64"):
        gptq_blocks(wide_llama, ckpt, "q4_1")
    with pytest.raises(CompressError, match="not a GPTQ checkpoint"):
        gptq_blocks(wide_llama, wide_llama, "q4_1")
    asym = tmp_path / "asym"
    quantize(wide_llama, asym, RTNConfig(bits=4, group_size=32, sym=False), device="cpu", progress=False)
    with pytest.raises(CompressError, match="needs --type q4_1"):
        gptq_blocks(wide_llama, asym, "q4_0")


def test_act_order_with_static_groups_is_carried(wide_llama, tmp_path):
    """Act-order solved with static groups keeps groups of 32 in column order: carried exactly."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "gptq"
    quantize(wide_llama, ckpt, GPTQConfig(bits=4, group_size=32, sym=True, act_order=True, static_groups=True,
                                          nsamples=8, seqlen=32), device="cpu", progress=False)
    blocks = gptq_blocks(wide_llama, ckpt, "q4_0")
    got = gguf.quants.dequantize(blocks["blk.0.ffn_down.weight"][1], gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_allclose(got, gptq_dequant(ckpt, "model.layers.0.mlp.down_proj"), rtol=0, atol=1e-6)
    # groups that follow the activation order (act-order without static groups) cannot be blocks
    tensors = load_file(ckpt / "model.safetensors")
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    tensors["model.layers.0.mlp.down_proj.g_idx"] = g_idx.flip(0).contiguous()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompressError, match="out of column order.*--static-groups"):
        gptq_blocks(wide_llama, ckpt, "q4_0")


def test_importance_matrix_steers_kquants(wide_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(tiny._TEXT[:50]))
    imp = importance_matrix(wide_llama, str(text), nsamples=4, seqlen=32)
    assert set(imp) == {f"blk.{i}.{n}.weight" for i in range(2) for n in
                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert imp["blk.0.ffn_down.weight"].shape == (192,) and (imp["blk.0.attn_q.weight"] > 0).all()
    rows = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    from compress.gguf.kquants import quantize_q4_k

    weights = np.abs(np.random.default_rng(1).standard_normal(256)).astype(np.float32)
    assert not np.array_equal(quantize_q4_k(rows), quantize_q4_k(rows, weights))


def test_cli_from_gptq(wide_llama, tmp_path):
    from test_cli import assert_clean_error, run

    ckpt = tmp_path / "gptq"
    quantize(wide_llama, ckpt, RTNConfig(bits=4, group_size=32, sym=False), device="cpu", progress=False)
    proc = run("export", "gguf", "--model", wide_llama, "--from-gptq", ckpt, "--type", "q4_1", "--out", tmp_path / "m.gguf")
    assert proc.returncode == 0, proc.stderr
    assert "Q4_1" in proc.stdout
    assert_clean_error(run("export", "gguf", "--model", wide_llama, "--from-gptq", ckpt, "--type", "q4_0",
                           "--out", tmp_path / "n.gguf"), "needs --type q4_1")
    assert not (tmp_path / "n.gguf").exists()
