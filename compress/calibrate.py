"""The layer-by-layer calibration runner shared by GPTQ, SparseGPT, Wanda and importance matrices.

A method observes the inputs of each Linear layer inside the repeated blocks and solves for its new
weight; the runner owns everything around that:

1. Build nothing but the model's skeleton (parameters on the meta device); load only the tensors
   outside the blocks (embeddings, rotary tables) and capture the inputs of block 0, with every keyword
   argument the model passes its blocks (attention mask, position ids or rotary embeddings), by
   stopping the forward pass at block 0.
2. For each block: load its tensors from the checkpoint; find the order in which its Linear layers
   run and which of them share an input (q/k/v, gate/up); for each such stage, in order, run the
   calibration batches through the block (stopping after the stage) while observers accumulate
   statistics, then solve and swap in the new weights, so later stages see the already-changed ones
   (true-sequential); run the batches through the finished block to get the next block's inputs; hand
   the block to the caller (which writes it out); free it.

Memory therefore holds one block plus the activations, whatever the depth; activations can live on
disk (``offload_dir``) instead of in memory.

Passes after a submodule is finished replay it instead of recomputing it: once every observed layer
inside a direct child of the block (an attention module, say) and every observed layer that runs
before it are solved, neither its weights nor its inputs change again, so its output for each batch
is recorded on the next pass that computes it and returned as is on later passes. When the child's
output is the output of its last Linear layer (checked on the first batch: the same tensor, unchanged),
that layer's input is recorded while the layer is observed, and once it is solved the child is computed
as that one layer applied to the record instead of all of it (an attention module becomes its output
projection; an MLP its down projection). A Llama block then costs one forward pass per batch plus the
Hessian products, instead of about two. The records cost a few more sets of activations, kept
wherever the activations are kept.

Precision: activations and weights are held in the runner's ``dtype``, and with ``autocast`` the
matrix products of the forwards run in that lower dtype under torch.autocast (norms, softmax and the
residual sums stay in ``dtype``). ``calibration_precision`` chooses: float32 on the CPU unless
bfloat16 products are asked for (1.5x faster on a CPU with AMX, at a measured cost in the result's
KL: BENCHMARKS.md), the checkpoint's half precision on a GPU. Whatever the choice, each layer's solve
starts from its weight as stored in the checkpoint, in float32, and methods accumulate their
statistics in float32.

A method is any object with ``wants(name) -> bool``, ``observer(in_features, device)`` (an object
with ``add_batch(inputs)``) and ``solve(name, weight [N, K] float32, observer) -> (new_weight,
payload)``; the payloads come back per layer in each BlockResult.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from .activations import ActivationStore, copy_values, same_values, to_cpu, to_device
from .checkpoint import all_finite, check_finite
from .errors import CompressError
from .memory import release_free_memory
from .models import find_blocks, find_linears, is_conv1d


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the wanted inputs are recorded."""


class Observer(Protocol):
    def add_batch(self, inputs: torch.Tensor) -> None: ...


class Method(Protocol):
    def wants(self, name: str) -> bool: ...

    def observer(self, in_features: int, device: torch.device) -> Observer: ...

    def solve(self, name: str, weight: torch.Tensor, observer: Observer) -> tuple[torch.Tensor, Any]: ...


CALIBRATION_DTYPES = ("auto", "float32", "bfloat16", "float16")


def calibration_precision(device: torch.device, reader, requested: str = "auto") -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype, autocast dtype or None) of the calibration forwards for ``requested``, one of
    CALIBRATION_DTYPES: the dtype of the matrix products. 'auto' is float32 on the CPU and the
    checkpoint's half precision on a GPU (float16 if it is float32). On the CPU, bfloat16 runs under
    autocast over float32 activations; on a GPU the whole block runs in the dtype asked for."""
    if requested not in CALIBRATION_DTYPES:
        raise CompressError(f"calibration dtype '{requested}' is not one of {', '.join(CALIBRATION_DTYPES)}")
    if device.type == "cpu":
        if requested == "float16":
            raise CompressError("float16 calibration needs a GPU; on the CPU use bfloat16 or float32")
        return (torch.float32, torch.bfloat16) if requested == "bfloat16" else (torch.float32, None)
    if requested != "auto":
        return getattr(torch, requested), None
    for key in reader.keys():
        dtype, _ = reader.info(key)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype, None
    return torch.float16, None


_DROPPED_KWARGS = ("past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions")


@dataclass
class BlockResult:
    """One finished block: its module (new weights in place) and the method's payload per layer."""

    index: int
    prefix: str
    module: nn.Module
    payloads: dict[str, Any] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def materialize(model: nn.Module, names: list[str], reader, key_of: dict[str, str], device, dtype) -> None:
    """Load the state-dict entries ``names`` of ``model`` from the checkpoint onto ``device``.

    Floating-point tensors are cast to ``dtype``; entries the checkpoint lacks (tied weights) stay as
    they are.
    """
    state = {}
    for name in names:
        key = key_of.get(name)
        if key is None:
            continue
        value = reader.get(key)
        check_finite(key, value)
        if value.is_floating_point():
            value = value.to(dtype)
        state[name] = value.to(device)
    model.load_state_dict(state, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Move a module's parameters back to the meta device, freeing their memory."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _hidden_of(args, kwargs):
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


class _Replay:
    """Stands in for a finished submodule's forward: computes each batch once, then returns the record."""

    def __init__(self, module: nn.Module, runner: "Runner", store: ActivationStore, forward=None):
        self.module, self.runner, self.store = module, runner, store
        self.forward = forward or module.forward
        self.slots: dict[int, int] = {}  # batch index -> position in the store

    def __call__(self, *args, **kwargs):
        batch = self.runner._batch
        if batch in self.slots:  # a copy: the block may change what it gets in place
            return copy_values(to_device(self.store[self.slots[batch]], self.runner.device))
        out = self.forward(*args, **kwargs)
        self.slots[batch] = len(self.store)
        self.store.append(copy_values(out))
        return out


@dataclass
class _Shortcut:
    """A child whose output is its last Linear's output: once that layer is solved, the child's output
    is the layer applied to its recorded input (``template`` rebuilds a tuple output around it)."""

    child: str
    layer: str
    template: Any  # None for a plain tensor output; else (position, length) of a tuple of Nones
    inputs: ActivationStore | None = None

    def forward(self, runner: Runner, layer: nn.Module):
        def run(*args, **kwargs):
            out = layer(to_device(self.inputs[runner._batch], runner.device))
            if self.template is None:
                return out
            position, length = self.template
            return tuple(out if i == position else None for i in range(length))
        return run


def _output_template(output, tensor) -> tuple[bool, Any]:
    """Whether ``output`` is ``tensor`` alone or a tuple holding it beside Nones, and how to rebuild it."""
    if output is tensor:
        return True, None
    if isinstance(output, tuple) and sum(o is tensor for o in output) == 1:
        position = next(i for i, o in enumerate(output) if o is tensor)
        if all(o is None for i, o in enumerate(output) if i != position):
            return True, (position, len(output))
    return False, None


class Runner:
    """Runs a method over every block of a model (see the module docstring)."""

    def __init__(self, model: nn.Module, reader, key_of: dict[str, str], *, device: torch.device, dtype: torch.dtype,
                 blocks: str | None = None, batch_size: int = 8, offload_dir: str | Path | None = None,
                 true_sequential: bool = True, replay: bool = True, autocast: torch.dtype | None = None):
        self.model = model.eval()  # no dropout: calibration must see what inference computes
        self.reader = reader
        self.key_of = key_of
        self.device = device
        self.dtype = dtype
        self.autocast = autocast  # the dtype of the matrix products, when lower than dtype
        self.blocks_name, self.blocks = find_blocks(model, blocks)
        self.batch_size = batch_size
        self.true_sequential = true_sequential
        self.replay = replay
        self._batch = -1  # index of the batch in flight, for _Replay and _Shortcut
        self._shortcuts: dict[str, _Shortcut] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="compress-acts-", dir=offload_dir)) if offload_dir else None

    # ------------------------------------------------------------------ inputs of block 0

    def capture(self, samples: torch.Tensor) -> tuple[ActivationStore, list[dict]]:
        """Hidden states entering block 0, per batch, and the keyword arguments the model passes."""
        prefix = self.blocks_name + "."
        outside = [n for n in self.model.state_dict(keep_vars=True) if not n.startswith(prefix)]
        materialize(self.model, outside, self.reader, self.key_of, self.device, self.dtype)
        hidden = ActivationStore(self._tmp / "in" if self._tmp else None)
        kwargs_list: list[dict] = []

        def grab(module, args, kwargs):
            h, rest, kw = _hidden_of(args, kwargs)
            if rest:
                kw = {**kw, "__args__": rest}
            kw = {k: v for k, v in kw.items() if k not in _DROPPED_KWARGS}
            hidden.append(h)
            kwargs_list.append(to_cpu(kw))
            raise StopForward

        handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.inference_mode():
                for batch in samples.split(self.batch_size):
                    ids = batch.to(self.device)
                    extra = {"use_cache": False} if _accepts(self.model.forward, "use_cache") else {}
                    try:
                        self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
                    except StopForward:
                        pass
                    else:
                        raise CompressError(f"the model never called its block list '{self.blocks_name}'; pass --blocks")
        finally:
            handle.remove()
            release_outside(self.model, prefix)
        # every batch usually gets the same masks and rotary tables: keep one copy
        if all(same_values(kwargs_list[0], kw) for kw in kwargs_list[1:]):
            kwargs_list = kwargs_list[:1]
        return hidden, kwargs_list

    # ------------------------------------------------------------------ blocks

    def _forward(self, block, h, kwargs, batch: int = -1):
        self._batch = batch
        kw = dict(to_device(kwargs, self.device))
        rest = kw.pop("__args__", ())
        if self.autocast is None:
            return block(h.to(self.device), *rest, **kw)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return block(h.to(self.device), *rest, **kw)

    def _kwargs(self, kwargs_list, i):
        return kwargs_list[i if len(kwargs_list) > 1 else 0]

    def stages(self, block: nn.Module, linears: dict[str, nn.Module], h0, kw0) -> list[list[list[str]]]:
        """Execution order of the block's layers on one batch, as stages of input-sharing groups.

        Returns a list of stages; each stage is a list of groups of layer names that receive the very
        same input tensor (q/k/v; gate/up). Without true-sequential order, one stage holds them all.
        """
        calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their memory from being reused
        outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (output, its value then)
        child_outputs: dict[str, list[Any]] = {}
        handles = []
        for name, layer in linears.items():
            def note(module, args, name=name):
                calls.append((name, args[0]))

            def result(module, args, output, name=name):
                outputs.setdefault(name, []).append((output, output.clone()))
            handles.append(layer.register_forward_pre_hook(note))
            handles.append(layer.register_forward_hook(result))
        self._child_calls: list[tuple[str, int]] = []  # (child name, number of layer calls before it)
        for cname, child in block.named_children():
            def enter(module, args, cname=cname):
                self._child_calls.append((cname, len(calls)))

            def leave(module, args, output, cname=cname):
                child_outputs.setdefault(cname, []).append(output)
            handles.append(child.register_forward_pre_hook(enter))
            handles.append(child.register_forward_hook(leave))
        try:
            with torch.inference_mode():
                self._forward(block, h0, kw0)
        finally:
            for hd in handles:
                hd.remove()
        seen, stages = set(), []
        for name, inp in calls:
            if name in seen:
                continue
            seen.add(name)
            if stages and stages[-1][-1][1] is inp:
                stages[-1][-1][0].append(name)
            elif stages and not self.true_sequential:
                stages[-1].append(([name], inp))
            else:
                stages.append([([name], inp)])
        missing = [n for n in linears if n not in seen]
        if missing:
            raise CompressError(f"layer {missing[0]} is never called by its block's forward pass, so it cannot be calibrated; "
                                "exclude it with --skip")
        self._first_call = {}
        for i, (name, _) in enumerate(calls):
            self._first_call.setdefault(name, i)
        self._shortcuts = self._find_shortcuts(block, linears, calls, outputs, child_outputs)
        return [[names for names, _ in stage] for stage in stages]

    def _find_shortcuts(self, block, linears, calls, outputs, child_outputs) -> dict[str, _Shortcut]:
        """Children (run once per pass) whose output is their last observed layer's output, unchanged.

        Only in true-sequential order with replay on: the layer's input is then recorded while it is
        observed, after every layer before it was solved, so the record is what later passes compute.
        """
        if not (self.replay and self.true_sequential):
            return {}
        prefix = next(n for n, m in self.model.named_modules() if m is block)
        found = {}
        for cname, outs in child_outputs.items():
            inside = [n for n, _ in calls if n.startswith(f"{prefix}.{cname}.")]
            if len(outs) != 1 or not inside:
                continue
            last = inside[-1]
            if inside.count(last) != 1 or len(outputs.get(last, ())) != 1:
                continue
            tensor, value = outputs[last][0]
            ok, template = _output_template(outs[0], tensor)
            if ok and torch.equal(tensor, value):  # not changed in place after the layer returned it
                found[cname] = _Shortcut(cname, last, template)
        return found

    def _replayable(self, block: nn.Module, prefix: str, linears: dict[str, nn.Module]) -> dict[str, set[str]]:
        """Direct children that can be replayed once the returned observed layers are all solved.

        A child qualifies when it runs exactly once per pass and contains observed layers: its output
        is fixed once they and every observed layer running before it are solved.
        """
        counts: dict[str, int] = {}
        for cname, _ in self._child_calls:
            counts[cname] = counts.get(cname, 0) + 1
        out = {}
        for cname, before in self._child_calls:
            if counts[cname] != 1:
                continue
            inside = {n for n in linears if n.startswith(f"{prefix}.{cname}.")}
            if not inside:
                continue
            earlier = {n for n in linears if self._first_call.get(n, len(self._first_call)) < before}
            out[cname] = inside | earlier
        return out

    def run(self, samples: torch.Tensor, method: Method, progress=None) -> Iterator[BlockResult]:
        """Yield each block after its layers were solved; the caller writes it before the next one."""
        hidden, kwargs_list = self.capture(samples)
        # blocks after the last one with observed layers (all skipped) need no inputs: stop the passes there
        last = max((i for i, b in enumerate(self.blocks)
                    if any(method.wants(n) for n in find_linears(b, f"{self.blocks_name}.{i}"))), default=-1)
        try:
            for index, block in enumerate(self.blocks):
                prefix = f"{self.blocks_name}.{index}"
                names = [f"{prefix}.{n}" for n in block.state_dict(keep_vars=True)]
                materialize(self.model, names, self.reader, self.key_of, self.device, self.dtype)
                linears = {n: m for n, m in find_linears(block, prefix).items() if method.wants(n)}
                result = BlockResult(index, prefix, block)
                patched: list[nn.Module] = []  # children whose forward is replaced while the block runs
                stores: list[ActivationStore] = []
                try:
                    if linears:
                        stages = self.stages(block, linears, hidden[0], self._kwargs(kwargs_list, 0))
                        result.order = [n for stage in stages for group in stage for n in group]
                        waiting = self._replayable(block, prefix, linears) if self.replay else {}
                        for cut in self._shortcuts.values():
                            cut.inputs = ActivationStore(self._tmp / f"input-{cut.child}" if self._tmp else None)
                            stores.append(cut.inputs)
                        recorded: list[tuple[_Replay, _Shortcut]] = []  # replays that run a shortcut
                        for k, stage in enumerate(stages):
                            self._solve_stage(block, stage, linears, hidden, kwargs_list, method, result, progress)
                            for rp, cut in [(rp, cut) for rp, cut in recorded if len(rp.slots) == len(hidden)]:
                                cut.inputs.clear()  # the replay holds the child's outputs now: the inputs can go
                                recorded.remove((rp, cut))
                            for cname in [c for c, needs in waiting.items() if needs <= result.payloads.keys()]:
                                del waiting[cname]
                                child = block.get_submodule(cname)
                                cut = self._shortcuts.get(cname)
                                forward = None
                                if cut is not None and cut.layer in result.payloads and len(cut.inputs) == len(hidden):
                                    forward = cut.forward(self, linears[cut.layer])
                                if k < len(stages) - 1:  # record on the next pass, replay on the ones after
                                    stores.append(ActivationStore(self._tmp / f"replay-{cname}" if self._tmp else None))
                                    if forward is not None:
                                        forward = _Replay(child, self, stores[-1], forward)
                                        recorded.append((forward, cut))
                                    else:
                                        forward = _Replay(child, self, stores[-1])
                                if forward is not None:
                                    child.forward = forward
                                    patched.append(child)
                    if index <= last:
                        hidden = self._advance(block, hidden, kwargs_list, index)
                finally:
                    for child in patched:
                        del child.forward  # the class's forward again
                    for store in stores:
                        store.clear()
                yield result
                release(block)
                self.reader.release()
                # the young generations only: a full collection walks every library object each block
                # (4.7 s of a SmolLM2 run), and the block's tensors are freed by reference counts anyway
                release_free_memory(full=False)
        finally:
            hidden.clear()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _solve_stage(self, block, stage, linears, hidden, kwargs_list, method, result, progress):
        observers, handles = {}, []
        last = stage[-1][-1]
        for group in stage:
            first = linears[group[0]]
            in_features = first.weight.shape[0] if is_conv1d(first) else first.in_features
            obs = method.observer(in_features, self.device)
            for name in group:
                observers[name] = obs

            records = [cut.inputs for cut in self._shortcuts.values() if cut.layer in group]

            def feed(module, args, obs=obs, stop=(last in group), records=records):
                obs.add_batch(args[0])
                for store in records:
                    store.append(args[0])
                if stop:
                    raise StopForward

            # the group's layers share one input: record it once, at the first of them; at the last
            # group of the stage nothing further is needed, so the pass stops there
            handles.append(linears[group[0]].register_forward_pre_hook(feed))
        try:
            with torch.inference_mode():
                for i in range(len(hidden)):
                    try:
                        self._forward(block, hidden[i], self._kwargs(kwargs_list, i), i)
                    except StopForward:
                        pass
        finally:
            for hd in handles:
                hd.remove()
        for group in stage:
            for name in group:
                layer = linears[name]
                conv = is_conv1d(layer)
                weight = self._stored_weight(name, layer)
                new, payload = method.solve(name, weight.t() if conv else weight, observers[name])
                layer.weight.data = (new.t() if conv else new).to(layer.weight.dtype).contiguous()
                result.payloads[name] = payload
                if progress is not None:
                    progress(name, payload)

    def _stored_weight(self, name: str, layer: nn.Module) -> torch.Tensor:
        """The layer's weight in float32: as the checkpoint stores it when the forwards run in a lower
        precision (the solve must not start from a rounded copy), else as loaded."""
        key = self.key_of.get(f"{name}.weight")
        if self.dtype == torch.float32 or key is None:
            return layer.weight.detach().float()
        return self.reader.get(key).to(device=self.device, dtype=torch.float32)

    def _advance(self, block, hidden: ActivationStore, kwargs_list, index: int) -> ActivationStore:
        """Run every batch through the finished block: the next block's inputs."""
        nxt = ActivationStore(self._tmp / f"b{index % 2}" if self._tmp else None)
        with torch.inference_mode():
            for i in range(len(hidden)):
                out = _first_tensor(self._forward(block, hidden[i], self._kwargs(kwargs_list, i), i))
                if not all_finite(out):
                    raise CompressError(
                        f"block {index} produces NaN or Inf on the calibration data; the model's weights or the data are out of range"
                    )
                nxt.append(out.to(self.dtype))
        hidden.clear()
        return nxt


def _accepts(fn, name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return name in params


def release_outside(model: nn.Module, prefix: str) -> None:
    """Free every parameter that does not belong to the block list (after block 0's inputs are known)."""
    for name, module in model.named_modules():
        if name.startswith(prefix) or name + "." == prefix:
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta":
                module._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def default_offload_dir() -> str | None:
    """Where activations go with --offload: $COMPRESS_OFFLOAD_DIR, else the system temporary folder (checked)."""
    from .outputs import offload_folder

    return str(offload_folder())
