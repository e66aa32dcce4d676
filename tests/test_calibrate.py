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


class Rounder(Identity):
    """Changes every weight (rounds it to a coarse grid), so later stages see different inputs."""

    def solve(self, name, weight, observer):
        return torch.round(weight * 8) / 8, None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
def test_replaying_finished_submodules_changes_nothing(tiny_model, arch, monkeypatch):
    kind = "masked" if arch == "bert" else "causal"
    path = tiny_model(arch, kind)
    samples = torch.randint(5, 100, (5, 16))
    outputs, calls = {}, {}
    for replay in (False, True):
        seen, count = [], {"n": 0}
        original = Runner._advance

        def spy(self, block, hidden, kwargs_list, index, seen=seen):
            nxt = original(self, block, hidden, kwargs_list, index)
            seen.extend(nxt[i].clone() for i in range(len(nxt)))
            return nxt

        monkeypatch.setattr(Runner, "_advance", spy)
        with CheckpointReader(path) as reader:
            runner = make_runner(path, reader, batch_size=2, replay=replay)
            attention = [name for name, _ in runner.blocks[0].named_children() if "att" in name][0]
            for block in runner.blocks:  # a layer inside the attention module runs only when the module does
                inner = next(m for m in block.get_submodule(attention).modules() if not list(m.children()))
                inner.register_forward_pre_hook(lambda *a, c=count: c.update(n=c["n"] + 1))
            for result in runner.run(samples, Rounder()):
                assert not any("forward" in vars(m) for m in result.module.modules()), "replay leaves nothing behind"
        monkeypatch.setattr(Runner, "_advance", original)
        outputs[replay], calls[replay] = seen, count["n"]
    assert all(torch.equal(a, b) for a, b in zip(outputs[False], outputs[True])) and len(outputs[True]) > 0
    # once the attention module is finished, its later runs come from the record, not from the module
    assert calls[True] < calls[False], calls


@pytest.mark.parametrize("replay", [False, True])
def test_a_llama_block_costs_one_forward_pass_per_batch(tiny_model, replay):
    """With replay, each Linear of a Llama block runs once per batch (plus the first batch's dry run):
    the attention module becomes its solved output projection applied to the recorded input, the MLP
    its down projection."""
    path = tiny_model("llama")
    samples = torch.randint(5, 100, (6, 16))
    with CheckpointReader(path) as reader:
        runner = make_runner(path, reader, batch_size=2, replay=replay)
        counts = {}
        for block in runner.blocks:
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear):
                    # counted when computed (a pass stopped at a layer's input does not compute it)
                    module.register_forward_hook(lambda *a, n=name: counts.update({n: counts.get(n, 0) + 1}))
        shortcuts = {}
        for result in runner.run(samples, Rounder()):
            shortcuts.update({c: s.layer.rsplit(".", 2)[-2:] for c, s in runner._shortcuts.items()})
    blocks, batches = len(runner.blocks), 3
    if replay:
        assert shortcuts == {"self_attn": ["self_attn", "o_proj"], "mlp": ["mlp", "down_proj"]}
        # the dry run plus one pass; o_proj also runs once more to record the attention's output
        assert counts["self_attn.q_proj"] == blocks * (1 + batches)
        assert counts["mlp.gate_proj"] == blocks * (1 + batches)
        assert counts["mlp.down_proj"] == blocks * (1 + batches)
    else:
        assert counts["self_attn.q_proj"] > blocks * (1 + batches)


def test_calibration_precision_choices():
    from compress.calibrate import calibration_precision
    from compress.errors import CompressError

    cpu = torch.device("cpu")
    assert calibration_precision(cpu, None, "auto") == (torch.float32, None)
    assert calibration_precision(cpu, None, "float32") == (torch.float32, None)
    # bfloat16 products run under autocast over float32 activations
    assert calibration_precision(cpu, None, "bfloat16") == (torch.float32, torch.bfloat16)
    for bad in ("float16", "int8"):
        with pytest.raises(CompressError):
            calibration_precision(cpu, None, bad)


def test_shortcut_inputs_are_freed_once_the_replay_holds_the_outputs(tiny_model):
    """The recorded o_proj inputs go as soon as the attention's outputs are recorded; with the down
    projection's inputs they never coexist beyond one block."""
    path = tiny_model("llama")
    sizes = []
    original = Runner._solve_stage

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sizes.append({c: len(s.inputs) for c, s in self._shortcuts.items()})

    with CheckpointReader(path) as reader:
        runner = make_runner(path, reader, batch_size=2)
        runner._solve_stage = spy.__get__(runner)
        for _ in runner.run(torch.randint(5, 100, (4, 16)), Rounder()):
            pass
    first = sizes[:4]  # after each pass of block 0's four stages: qkv, o, gate/up, down
    # recorded in the o_proj pass, used once (the gate/up pass, which records the attention's outputs)
    # and freed right after it: the down_proj pass already reads the replay
    assert [s["self_attn"] for s in first] == [0, 2, 2, 0]
    assert [s["mlp"] for s in first] == [0, 0, 0, 2]
