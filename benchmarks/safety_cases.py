"""Bad inputs against the real command line: a fixed table of named cases, each run as a `compress`
subprocess on tiny models built in a temporary folder, printed as a Markdown table.

    python benchmarks/safety_cases.py [--only NAME ...] [--timeout SECONDS] [--keep]

Columns: the case, the command (the temporary folder written $T), the exit code ('hung' when the
command had not ended after --timeout seconds and was killed), the first line of stderr (the last
line of a traceback), whether every input stayed byte-identical, what was left at --out (and any
.NAME.tmp-* / .NAME.old-* temporary beside it), and the verdict against what the case expects:
a refusal (exit 2 with one 'error: ' line), a success (exit 0, output present), or either.

Everything happens inside the temporary folder: a FIFO and a device node with /dev/null's numbers
(made only when running as root) stand in for /dev/null, which is never touched. Each command runs
in its own session with its address space capped at MEMORY_CAP, so a command reading /dev/zero fails
instead of eating the machine. Root ignores permission bits: the unwritable-folder case only
refuses when run as another user.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

MEMORY_CAP = 6 * 1024**3
NO_EVAL = ["--no-eval", "--device", "cpu"]
QUICK = ["--no-latency", "--eval-tokens", "64", "--eval-samples", "4", "--eval-seqlen", "16", "--repeats", "1",
         "--device", "cpu"]
TRAIN = ["--batch-size", "2", "--max-length", "16", "--max-samples", "4", "--no-train-eval", *NO_EVAL]
GPTQ = ["quantize", "--method", "gptq", "--group-size", "32", "--nsamples", "2", "--seqlen", "16"]
RTN = ["quantize", "--method", "rtn", "--group-size", "32"]


@dataclass
class Result:
    code: str
    stderr: str
    seconds: float


@dataclass
class Case:
    name: str
    argv: list[str]
    out: Path | None = None
    inputs: tuple[Path, ...] = ()
    expect: str = "refuse"                   # refuse, succeed or either
    env: dict = field(default_factory=dict)
    note: str = ""
    prepare: object = None                   # called before anything is measured (to make an earlier run's state)
    extra: dict = field(default_factory=dict)  # filled by custom runners: more to report


def compress_exe() -> list[str]:
    exe = shutil.which("compress", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "compress"]


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def start(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(compress_exe() + argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_limits,  # noqa: PLW1509 (no threads here)
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **(env or {})})


def finish(proc: subprocess.Popen, timeout: float, began: float) -> Result:
    try:
        _, err = proc.communicate(timeout=max(timeout - (time.monotonic() - began), 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this script started for the command
        _, err = proc.communicate()
        return Result("hung", err or "", time.monotonic() - began)
    code = proc.returncode
    return Result(str(code) if code >= 0 else f"signal {-code}", err or "", time.monotonic() - began)


def run(argv: list[str], cwd: Path, timeout: float, env: dict | None = None) -> Result:
    began = time.monotonic()
    return finish(start(argv, cwd, env), timeout, began)


def tree_digest(path: Path) -> str:
    """Names, types, modes and contents below ``path`` (links not followed; FIFOs and devices by type)."""
    import hashlib

    h = hashlib.sha256()
    if not os.path.lexists(path):
        return "absent"
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() else [path]:
        s = os.lstat(p)
        h.update(f"{p.relative_to(path) if p != path else '.'} {stat.S_IFMT(s.st_mode)} {s.st_mode:o}\n".encode())
        if stat.S_ISREG(s.st_mode):
            h.update(p.read_bytes())
        elif stat.S_ISLNK(s.st_mode):
            h.update(os.readlink(p).encode())
    return h.hexdigest()


def temporaries(folder: Path) -> list[str]:
    """Hidden entries of ``folder``: the .NAME.tmp-* / .NAME.old-* temporaries and claims of a run."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def first_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return "Traceback: " + lines[-1]
    return lines[0] if lines else ""


def verdict(case: Case, res: Result, inputs_same: bool, left: str) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    problems = []
    if res.code == "hung":
        problems.append("hung")
    elif res.code not in ("0", "2"):
        problems.append(f"exit {res.code}")
    if res.code == "2" and not (len(lines) == 1 and lines[0].startswith("error: ")):
        problems.append("not one 'error:' line")
    if not inputs_same:
        problems.append("input changed")
    if res.code != "0" and left not in ("nothing", "as before") and "tmp" not in left:
        problems.append("left output")
    if "tmp" in left:
        problems.append("left temporaries")
    if case.expect == "refuse" and res.code == "0":
        problems.append("accepted")
    if case.expect == "succeed" and res.code != "0":
        problems.append("refused")
    problems += case.extra.pop("problems", [])
    return "ok" if not problems else "FAIL: " + ", ".join(problems)


def run_case(case: Case, root: Path, timeout: float, runner=None) -> dict:
    if case.prepare is not None:
        case.prepare(case, timeout)
    before = {p: tree_digest(p) for p in case.inputs}
    out_before = tree_digest(case.out) if case.out else None
    beside_before = listing(case.out.parent) if case.out else set()
    res = runner(case, timeout) if runner else run(case.argv, root / "work", timeout, case.env)
    inputs_same = all(tree_digest(p) == h for p, h in before.items())
    left = "nothing"
    if case.out is not None:
        now = tree_digest(case.out)
        left = "nothing" if now == "absent" else "as before" if now == out_before else "output"
        new = sorted(listing(case.out.parent) - beside_before - {case.out.name})
        hidden = [n for n in new if n.startswith(".")]
        if hidden:
            left += f" + tmp {hidden[0]}" + (f" (+{len(hidden) - 1})" if len(hidden) > 1 else "")
        elif new and res.code != "0":
            left += f" + beside it: {', '.join(new)}"
    command = "compress " + " ".join(case.argv).replace(str(root), "$T")
    if len(command) > 160:
        command = command[:157] + "..."
    message = first_line(res.stderr).replace(str(root), "$T")
    if case.extra.get("message"):
        message = case.extra.pop("message") + (f"; {message}" if message else "")
    return {"case": case.name, "command": command, "exit": res.code, "message": message[:300],
            "input same": "yes" if inputs_same else "NO", "left at --out": left,
            "verdict": verdict(case, res, inputs_same, left), "note": case.note}


# ---------------------------------------------------------------------------------------------- fixtures

def build_models(root: Path) -> dict[str, Path]:
    """Tiny models (tests/tiny.py) and a GPTQ-format checkpoint of each llama, made once; cases copy them."""
    import tiny

    models = {"llama": tiny.build("llama", root / "llama"), "bert": tiny.build("bert", root / "bert"),
              "embedding": tiny.build("bert", root / "embedding", kind="embedding")}
    # GGUF's Q4 blocks take rows of whole 32-column groups: two Llamas of one geometry (feed-forward 128), other weights
    intermediate, tiny.INTERMEDIATE = tiny.INTERMEDIATE, 128
    try:
        models["llama-128"] = tiny.build("llama", root / "llama-128")
        models["llama-128-other"] = tiny.build("llama", root / "llama-128-other", seed=1)
    finally:
        tiny.INTERMEDIATE = intermediate
    for name in ("llama-128", "llama-128-other"):
        res = run([*RTN, "--model", str(models[name]), "--out", str(root / f"{name}-gptq"), *NO_EVAL], root, 300)
        if res.code != "0":
            raise SystemExit(f"could not build the GPTQ checkpoint of {name}: {res.stderr[-2000:]}")
        models[f"{name}-gptq"] = root / f"{name}-gptq"
    return models


def damaged(models: dict, case_dir: Path, arch: str, *, config=None, tensors=None) -> Path:
    """A copy of ``arch`` with config.json replaced (bytes) or patched (dict), or its tensors edited."""
    folder = case_dir / f"{arch}-damaged"
    shutil.copytree(models[arch], folder)
    if isinstance(config, bytes):
        (folder / "config.json").write_bytes(config)
    elif config is not None:
        data = json.loads((folder / "config.json").read_text())
        data.update(config)
        (folder / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        save_file(tensors(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def shorter_row(state: dict) -> dict:
    name = next(k for k in sorted(state) if k.endswith(("q_proj.weight", "query.weight")))
    return {**state, name: state[name][:-1].clone()}


def without_tensor(state: dict) -> dict:
    name = next(k for k in sorted(state) if k.endswith(("k_proj.weight", "key.weight")))
    return {k: v for k, v in state.items() if k != name}


def integer_weights(state: dict) -> dict:
    import torch

    return {k: (v * 100).to(torch.int32) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- custom runs

def concurrent(case: Case, timeout: float) -> Result:
    """The same command twice at once: one should write the output, the other refuse."""
    began = time.monotonic()
    procs = [start(case.argv, case.out.parent, case.env) for _ in range(2)]
    results = [finish(p, timeout, began) for p in procs]
    codes = sorted(r.code for r in results)
    case.extra["message"] = f"exits {', '.join(r.code for r in results)}"
    if codes != ["0", "2"]:
        case.extra.setdefault("problems", []).append(f"exits {codes}, not one 0 and one 2")
    loser = next((r for r in results if r.code != "0"), results[1])
    return Result("0" if "0" in codes else loser.code, loser.stderr, max(r.seconds for r in results))


def interrupted(sig: int, wait_for: str):
    """Send ``sig`` once the run's temporary output appears, then run the same command again."""
    def runner(case: Case, timeout: float) -> Result:
        began = time.monotonic()
        proc = start(case.argv, case.out.parent, case.env)
        seen = False
        while proc.poll() is None and time.monotonic() - began < timeout:
            if any(p.name.startswith(wait_for) for p in case.out.parent.iterdir()):
                seen = True
                time.sleep(0.2)
                os.kill(proc.pid, sig)
                break
            time.sleep(0.02)
        first = finish(proc, timeout, began)
        stale = temporaries(case.out.parent)
        after_signal = "nothing" if not os.path.lexists(case.out) else "output"
        rerun = run(case.argv, case.out.parent, timeout, case.env)
        left_after = temporaries(case.out.parent)
        case.extra["message"] = (f"{'signalled' if seen else 'ended before the signal'}: exit {first.code} "
                                 f"({first_line(first.stderr)[:120]}); at --out: {after_signal}, "
                                 f"{len(stale)} temporaries; rerun: exit {rerun.code} ({first_line(rerun.stderr)[:120]}), "
                                 f"{len(left_after)} temporaries after it")
        problems = case.extra.setdefault("problems", [])
        if not seen:
            problems.append("finished before the signal")
        if first.code not in ("2", "130", "143", f"signal {sig}") or first.code == "1":
            problems.append(f"first run exit {first.code}")
        if after_signal != "nothing" and first.code != "0":
            problems.append("interrupted run left output")
        if sig == signal.SIGTERM and stale:
            problems.append("SIGTERM left temporaries")
        if left_after:
            problems.append("temporaries remain after the rerun")
        case.expect = "succeed"
        return rerun
    return runner


# ---------------------------------------------------------------------------------------------- cases

def make_cases(root: Path, models: dict) -> list[tuple[Case, object]]:
    """(case, custom runner or None) for every named case; each case gets a folder of its own."""
    cases = []

    def folder(name: str) -> Path:
        d = root / "cases" / name
        d.mkdir(parents=True)
        return d

    def copy(name: str, d: Path) -> Path:
        return Path(shutil.copytree(models[name], d / name))

    def add(name, argv, out=None, inputs=(), expect="refuse", runner=None, **kw):
        cases.append((Case(name, [str(a) for a in argv], out, tuple(inputs), expect, **kw), runner))

    # output paths
    d = folder("out-is-input"); m = copy("llama", d)
    add("--out is the input, --overwrite", [*RTN, "--model", m, "--out", m, "--overwrite", *NO_EVAL], m, [m])
    d = folder("out-parent"); m = copy("llama", d)
    add("--out is the input's parent, --overwrite", [*RTN, "--model", m, "--out", d, "--overwrite", *NO_EVAL], d, [m])
    d = folder("out-inside"); m = copy("llama", d)
    add("--out inside the input", [*RTN, "--model", m, "--out", m / "q", *NO_EVAL], m / "q", [m])
    if os.geteuid() == 0:
        d = folder("out-devnull"); m = copy("llama", d)
        node = d / "null"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        add("--out a device (a /dev/null node), --overwrite", [*RTN, "--model", m, "--out", node, "--overwrite", *NO_EVAL],
            node, [m], note="a node with /dev/null's numbers inside $T; the real /dev/null is never used")
    d = folder("out-fifo"); m = copy("llama", d)
    os.mkfifo(d / "fifo")
    add("--out a FIFO, --overwrite", [*RTN, "--model", m, "--out", d / "fifo", "--overwrite", *NO_EVAL], d / "fifo", [m])
    d = folder("out-symlink"); m = copy("llama", d)
    (d / "link").symlink_to(m)
    add("--out a symlink to the input, --overwrite", [*RTN, "--model", m, "--out", d / "link", "--overwrite", *NO_EVAL],
        d / "link", [m])
    d = folder("out-parent-file"); m = copy("llama", d)
    (d / "file").write_text("a file\n")
    add("parent of --out is a file", [*RTN, "--model", m, "--out", d / "file" / "q", *NO_EVAL], d / "file" / "q", [m])
    d = folder("out-too-long"); m = copy("llama", d)
    add("--out name too long", [*RTN, "--model", m, "--out", d / ("x" * 300), *NO_EVAL], d / ("x" * 300), [m])
    d = folder("out-unwritable"); m = copy("llama", d)
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    add("--out in an unwritable folder", [*RTN, "--model", m, "--out", d / "ro" / "q", *NO_EVAL], d / "ro" / "q", [m],
        expect="refuse" if os.geteuid() else "either",
        note="root ignores permission bits: as root this writes" if os.geteuid() == 0 else "")
    d = folder("out-foreign"); m = copy("llama", d)
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("mine\n")
    add("--out a folder of someone else's files, --overwrite",
        [*RTN, "--model", m, "--out", d / "mine", "--overwrite", *NO_EVAL], d / "mine", [m, d / "mine"])
    d = folder("eval-out-input"); m = copy("llama", d)
    add("eval --out is the input", ["eval", "--model", m, "--out", m, *QUICK], m, [m])
    d = folder("checkpoints-teacher"); m = copy("llama", d)
    add("distill --checkpoints is the teacher folder",
        ["distill", "--model", m, "--out", d / "student", "--checkpoints", m, "--steps", "1", "--student-layers", "1", *TRAIN],
        d / "student", [m])
    d = folder("lora-leftover"); m = copy("llama", d)
    add("qat --lora refused after quantizing its base",
        ["qat", "--lora", "--model", m, "--out", d / "adapters", "--data", d / "missing.txt", "--steps", "1", *TRAIN],
        d / "adapters", [m], note="an adapters-base-w4 folder left beside --out counts as left output")
    d = folder("concurrent"); m = copy("llama", d)
    add("two runs at once, same --out", [*GPTQ, "--model", m, "--out", d / "q", *NO_EVAL], d / "q", [m],
        expect="succeed", runner=concurrent)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        d = folder(sig.name.lower()); m = copy("llama", d)
        add(f"{sig.name} during gptq, then rerun",
            ["quantize", "--method", "gptq", "--group-size", "32", "--nsamples", "64", "--seqlen", "128",
             "--model", m, "--out", d / "q", *NO_EVAL], d / "q", [m], runner=interrupted(sig, ".q.tmp-"))
    d = folder("json-missing"); m = copy("llama", d)
    add("--json into a missing folder", ["eval", "--model", m, "--json", d / "no" / "r.json", *QUICK], d / "no", [m],
        expect="either")
    add("--json with an unknown extension", ["eval", "--model", m, "--json", d / "r.xyz", *QUICK], d / "r.xyz", [m],
        expect="either")
    add("--plot into a missing folder", ["eval", "--model", m, "--plot", d / "no" / "r.png", *QUICK], d / "no", [m],
        expect="either")
    add("--plot with an unknown extension", ["eval", "--model", m, "--plot", d / "r.xyz", *QUICK], d / "r.xyz", [m],
        expect="either")
    add("--json is the input's config.json", ["eval", "--model", m, "--json", m / "config.json", *QUICK], None, [m],
        expect="either")
    d = folder("offload-file"); m = copy("llama", d)
    (d / "file").write_text("a file\n")
    add("--offload with COMPRESS_OFFLOAD_DIR a file", [*GPTQ, "--offload", "--model", m, "--out", d / "q", *NO_EVAL],
        d / "q", [m], env={"COMPRESS_OFFLOAD_DIR": str(d / "file")})

    # damaged model folders
    for name, arch, kw in (
        ("config.json is a JSON list", "llama", {"config": b"[1, 2]"}),
        ('"hidden_size": "abc"', "llama", {"config": {"hidden_size": "abc"}}),
        ("hidden size not a multiple of the heads", "llama", {"config": {"hidden_size": 66}}),
        ("negative layer count", "llama", {"config": {"num_hidden_layers": -2}}),
        ("huge layer count (2**40)", "llama", {"config": {"num_hidden_layers": 2**40}}),
        ('BERT "hidden_act": ""', "bert", {"config": {"hidden_act": ""}}),
    ):
        d = folder(name.replace(" ", "-").replace('"', "").replace(":", "").replace("*", ""))
        m = damaged(models, d, arch, **kw)
        add(name + " (rtn)", [*RTN, "--model", m, "--out", d / "q", *NO_EVAL], d / "q", [m])
    for command, argv, suffix in (("rtn", RTN, ""), ("gptq", GPTQ, ""), ("nf4", ["quantize", "--method", "nf4"], ""),
                                  ("magnitude prune", ["prune", "--method", "magnitude"], ""),
                                  ("export gguf", ["export", "gguf"], ".gguf")):
        d = folder(f"shape-{command.replace(' ', '-')}")
        m = damaged(models, d, "llama", tensors=shorter_row)
        tail = NO_EVAL if argv[0] != "export" else []
        add(f"tensor shape unlike config ({command})", [*argv, "--model", m, "--out", d / f"q{suffix}", *tail],
            d / f"q{suffix}", [m])
    d = folder("missing-tensor"); m = damaged(models, d, "llama", tensors=without_tensor)
    add("tensor missing (export gguf)", ["export", "gguf", "--model", m, "--out", d / "m.gguf"], d / "m.gguf", [m])
    d = folder("garbage-safetensors"); m = damaged(models, d, "llama")
    (m / "model.safetensors").write_bytes(b"\x89not a safetensors file" * 10)
    add("weights file is garbage (export gguf)", ["export", "gguf", "--model", m, "--out", d / "m.gguf"], d / "m.gguf", [m])
    d = folder("int-weights"); m = damaged(models, d, "llama", tensors=integer_weights)
    add("integer weights (rtn)", [*RTN, "--model", m, "--out", d / "q", *NO_EVAL], d / "q", [m])
    d = folder("pooling"); m = copy("embedding", d)
    (m / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (m / "1_Pooling").mkdir()
    (m / "1_Pooling" / "config.json").write_text("{pooling: mean")
    add("pooling config not JSON (eval)", ["eval", "--model", m, *QUICK], None, [m])
    d = folder("eval-kinds"); a, b = copy("llama", d), copy("bert", d)
    add("eval of a causal LM against a masked LM", ["eval", "--model", a, "--model", b, *QUICK], None, [a, b],
        expect="either")
    d = folder("from-gptq-other"); m = copy("llama-128", d)
    add("export gguf --from-gptq of its own GPTQ checkpoint",
        ["export", "gguf", "--type", "q4_0", "--model", m, "--from-gptq", models["llama-128-gptq"], "--out", d / "own.gguf"],
        d / "own.gguf", [m, models["llama-128-gptq"]], expect="succeed")
    add("export gguf --from-gptq of another model (same shapes)",
        ["export", "gguf", "--type", "q4_0", "--model", m, "--from-gptq", models["llama-128-other-gptq"], "--out", d / "m.gguf"],
        d / "m.gguf", [m, models["llama-128-other-gptq"]], note="same geometry, other weights")
    add("export gguf --from-gptq of a BERT for a Llama",
        ["export", "gguf", "--type", "q4_0", "--model", m, "--from-gptq", models["bert"], "--out", d / "m2.gguf"],
        d / "m2.gguf", [m])
    d = folder("temperature"); m = copy("llama", d)
    add("distill --temperature inf", ["distill", "--model", m, "--out", d / "s", "--temperature", "inf", "--steps", "1",
                                       "--student-layers", "1", *TRAIN], d / "s", [m])

    # data
    d = folder("data-fifo"); m = copy("llama", d)
    os.mkfifo(d / "calib.txt")
    add("calibration data is a FIFO (gptq)", [*GPTQ, "--calib", d / "calib.txt", "--model", m, "--out", d / "q", *NO_EVAL],
        d / "q", [m])
    d = folder("data-zero"); m = copy("llama", d)
    add("calibration data is /dev/zero (gptq)", [*GPTQ, "--calib", "/dev/zero", "--model", m, "--out", d / "q", *NO_EVAL],
        d / "q", [m], note=f"address space capped at {MEMORY_CAP >> 30} GiB")
    d = folder("eval-data-zero"); m = copy("llama", d)
    add("quantize with the closing table's --eval-data /dev/zero",
        [*RTN, "--model", m, "--out", d / "q", "--eval-data", "/dev/zero", *QUICK], d / "q", [m],
        note="the evaluation flags are checked before the output is written, or the output stays")
    d = folder("resume"); m = copy("llama", d)
    add("distill --resume, optimizer state not weights_only-loadable",
        ["distill", "--model", m, "--out", d / "s", "--resume", "--steps", "3", "--save-steps", "1", "--student-layers", "1",
         *TRAIN], d / "s", [m, d / "s.checkpoints"], prepare=interrupted_run_with_bad_optimizer)
    return cases


def interrupted_run_with_bad_optimizer(case: Case, timeout: float) -> None:
    """Train two steps keeping checkpoints, remove the output (as if the run had stopped), poison the
    newest optimizer state with an object torch.load(weights_only=True) refuses."""
    import torch

    out = case.out
    first = [a for a in case.argv if a != "--resume"]
    first[first.index("--steps") + 1] = "2"
    res = run([*first, "--keep-checkpoints"], out.parent, timeout)
    checkpoints = sorted(out.with_name(out.name + ".checkpoints").glob("checkpoint-*"))
    if res.code != "0" or not checkpoints:
        raise SystemExit(f"the first distillation run failed: exit {res.code} {first_line(res.stderr)}")
    shutil.rmtree(out)
    torch.save({"state": {}, "param_groups": [], "note": Path("not a tensor")}, checkpoints[-1] / "optimizer.pt")


def table(rows: list[dict]) -> str:
    cols = ["case", "command", "exit", "message", "input same", "left at --out", "verdict"]
    esc = (lambda s: str(s).replace("|", "\\|").replace("\n", " "))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(esc(r[c]) + (f" ({r['note']})" if c == "case" and r["note"] else "")
                                       for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="run the cases whose name contains one of these words")
    ap.add_argument("--timeout", type=float, default=90, help="seconds before a command counts as hung (default 90)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and print where it is")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="compress-safety-"))
    try:
        (root / "work").mkdir()
        models = build_models(root / "models")
        rows = []
        for case, runner in make_cases(root, models):
            if args.only and not any(w in case.name for w in args.only):
                continue
            rows.append(run_case(case, root, args.timeout, runner))
            print(f"{rows[-1]['verdict']:<40} {case.name}", file=sys.stderr, flush=True)
        print(table(rows))
        failing = sum(r["verdict"] != "ok" for r in rows)
        print(f"\n{len(rows) - failing} ok, {failing} failing")
    finally:
        for p in root.rglob("*"):  # the unwritable folder, for the cleanup
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
