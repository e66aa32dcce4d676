"""The calibration runner: captured block inputs, true-sequential stages, one block in memory at a time."""

import pytest
import torch

from compress.calibrate import Runner
from compress.checkpoint import CheckpointReader
from compress.models import build_skeleton, checkpoint_key_map, detect_kind, load, load_config, read_config_dict


class Identity:
    """A method that observes nothing and changes nothing."""

    def wants(self, name):
        return True

    def observer(self, in_features, device):
        class Nothing:
            def add_batch(self, x):
                pass
        return Nothing()

    def solve(self, name, weight, observer):
        return weight, None


class Recorder(Identity):
    """Counts the inputs each observer sees."""

    def __init__(self):
        self.rows = {}

    def observer(self, in_features, device):
        class Count:
            def __init__(self):
                self.n = 0

            def add_batch(self, x):
                self.n += x.reshape(-1, x.shape[-1]).shape[0]
        return Count()

    def solve(self, name, weight, observer):
        self.rows[name] = observer.n
        return weight, observer.n


def make_runner(path, reader, **kw):
    kind = detect_kind(path, read_config_dict(path))
    skeleton = build_skeleton(load_config(path), kind)
    return Runner(skeleton, reader, checkpoint_key_map(skeleton, reader.keys()), device=torch.device("cpu"),
                  dtype=torch.float32, **kw)


EXPECTED_STAGES = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "bert": [["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
             ["intermediate.dense"], ["output.dense"]],
}


@pytest.mark.parametrize("arch", list(EXPECTED_STAGES))
def test_stages_follow_execution_order(tiny_model, arch):
    path = tiny_model(arch)
    with CheckpointReader(path) as reader:
        runner = make_runner(path, reader, batch_size=2)
        hidden, kwargs = runner.capture(torch.randint(5, 100, (2, 16)))
        block = runner.blocks[0]
        from compress.calibrate import materialize
        from compress.models import find_linears

        prefix = f"{runner.blocks_name}.0"
        materialize(runner.model, [f"{prefix}.{n}" for n in block.state_dict()], reader, runner.key_of,
                    runner.device, runner.dtype)
        stages = runner.stages(block, find_linears(block, prefix), hidden[0], kwargs[0])
    strip = lambda n: n[len(prefix) + 1:]
    got = [sorted(strip(n) for n in group) for stage in stages for group in stage]
    want = [sorted(g) for g in EXPECTED_STAGES[arch]]
    if arch == "opt":  # OPT calls k_proj before q_proj; the group is what matters
        got, want = [sorted(g) for g in got], [sorted(g) for g in want]
    assert got == want


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "bert", "mistral"])
def test_block_inputs_match_the_full_model(tiny_model, arch, monkeypatch):
    """Blocks run from captured inputs and keyword arguments reproduce the model's own hidden states."""
    path = tiny_model(arch)
    samples = torch.randint(5, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    outputs = []
    original = Runner._advance

    def spy(self, block, hidden, kwargs_list, index):
        nxt = original(self, block, hidden, kwargs_list, index)
        outputs.append(torch.cat([nxt[i] for i in range(len(nxt))]))
        return nxt

    monkeypatch.setattr(Runner, "_advance", spy)
    with CheckpointReader(path) as reader:
        runner = make_runner(path, reader, batch_size=3)  # uneven batches on purpose
        for _ in runner.run(samples, Identity()):
            pass
    full = load(path).model
    with torch.no_grad():
        out = full(input_ids=samples, attention_mask=torch.ones_like(samples), output_hidden_states=True)
    for i in range(len(outputs) - 1):  # hidden_states[i + 1] is the output of block i (the last one is normed)
        torch.testing.assert_close(outputs[i], out.hidden_states[i + 1], rtol=1e-4, atol=1e-4)


def test_one_block_in_memory_at_a_time(tiny_model):
    path = tiny_model("llama")
    with CheckpointReader(path) as reader:
        runner = make_runner(path, reader, batch_size=2)
        for result in runner.run(torch.randint(5, 100, (2, 16)), Identity()):
            loaded = [i for i, b in enumerate(runner.blocks) if any(p.device.type != "meta" for p in b.parameters())]
            assert loaded == [result.index]
            assert runner.model.model.embed_tokens.weight.device.type == "meta"
    assert all(p.device.type == "meta" for p in runner.model.parameters())


def test_every_layer_sees_every_calibration_token(tiny_model):
    path = tiny_model("gpt2")
    method = Recorder()
    with CheckpointReader(path) as reader:
        runner = make_runner(path, reader, batch_size=2)
        for _ in runner.run(torch.randint(5, 100, (5, 12)), method):
            pass
    assert set(method.rows.values()) == {5 * 12} and len(method.rows) == 8


def test_activations_on_disk_give_the_same_result(tiny_model, tmp_path, monkeypatch):
    path = tiny_model("qwen2")
    samples = torch.randint(5, 100, (4, 16))
    results = []
    for offload in (None, tmp_path):
        seen = []
        original = Runner._advance

        def spy(self, block, hidden, kwargs_list, index, seen=seen):
            nxt = original(self, block, hidden, kwargs_list, index)
            seen.append(nxt[len(nxt) - 1].clone())
            return nxt

        monkeypatch.setattr(Runner, "_advance", spy)
        with CheckpointReader(path) as reader:
            runner = make_runner(path, reader, batch_size=2, offload_dir=offload)
            for _ in runner.run(samples, Identity()):
                pass
        results.append(seen)
        monkeypatch.setattr(Runner, "_advance", original)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert list(tmp_path.iterdir()) == [], "activation files are removed afterwards"
