"""4-bit kernels end to end: a quantized model runs through the dispatcher, and the harness reports its
decode speed under each kernel that can run it."""

import torch

import compress
from compress.config import RTNConfig
from compress_kernels import dispatch


def test_quantized_model_same_logits_on_every_kernel_and_speed_per_kernel(tiny_model, tmp_path, fast_eval):
    out = tmp_path / "q"
    compress.quantize(tiny_model("llama"), out, RTNConfig(bits=4, group_size=32), progress=False)
    loaded = compress.load(out)
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert dispatch.choose_backend(torch.zeros(1, 8), **_layer(loaded)) == "cpu_int4"
        fast = loaded.model(input_ids=ids).logits
        with dispatch.forced("reference"):
            slow = loaded.model(input_ids=ids).logits
    assert (fast - slow).abs().max() < 1e-4 * slow.abs().max()

    report = compress.compare([loaded], fast_eval, progress=False)
    speeds = report.results[0].latency["decode_tok_s_by_kernel"]
    assert list(speeds) == ["cpu_int4", "reference"] and all(v > 0 for v in speeds.values())
    assert "decode tok/s by kernel: cpu_int4" in report.table()


def _layer(loaded):
    from compress.quant.linear import QuantLinear

    m = next(m for m in loaded.model.modules() if isinstance(m, QuantLinear))
    return dict(qweight=m.qweight, qzeros=m.qzeros, scales=m.scales, g_idx=m.g_idx, bits=m.bits, bias=m.bias,
                zero_offset=m.zero_offset)
