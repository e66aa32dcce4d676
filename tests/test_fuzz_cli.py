"""Property-based fuzzing of the command line: damaged model folders, flag values and output paths.

Each example copies a tiny model (2 layers, hidden size 64) into a scratch folder of its own, runs one
command in-process through compress.cli.main and checks the contract every command keeps:

- the exit code is 0 or 2: never an uncaught exception, never a hang of more than HANG_S seconds;
- on exit 2, stderr is one line starting with "error: ";
- the input model folder is byte-identical, and so is everything else that was in the scratch folder
  (an explicit --json / --plot target aside);
- on failure nothing is left at --out (an existing --out is as it was), nor anything else new apart
  from empty parent folders of --out; no hidden temporary (.NAME.tmp-*, .NAME.old-*) is ever left;
- nothing outside the scratch folder changed (names, sizes and mtimes of the whole pytest base folder);
- on exit 0 the output exists and loads (compress.load, the GGUF magic, or a JSON report).

Output paths that must be refused (the input, its parents and children, the working folder, a foreign
file or folder, a FIFO) are refused with exit 2 even with --overwrite.

What is drawn lives in cli_fuzz.py. While an example runs, the address space is capped at its size
plus MEMORY_HEADROOM, so a configuration that asks for terabytes fails (as an uncaught MemoryError)
instead of swapping the machine.

Examples are drawn derandomized, so every run draws the same ones: 150 damaged model folders, 90 flag
combinations and 90 output paths; identical draws run once, which leaves about 310 commands. Measured
on two cores shared with other work: about 15 s, 35 s and 30 s, 85 s with the set-up (a hang costs
HANG_S more).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import tiny
from cli_fuzz import (
    NO_EVAL,
    PINNED_DAMAGED,
    PINNED_FLAGS,
    SIDE_TARGETS,
    Example,
    damage_checkpoint,
    damage_config,
    damaged_model_examples,
    flag_examples,
    make_out,
    output_path_examples,
    write_data_files,
)
from hypothesis import HealthCheck, Phase, example, given, settings

HANG_S = 30
MEMORY_HEADROOM = 4 * 1024**3
TMP_MARKERS = (".tmp-", ".old-")


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=[HealthCheck.too_slow])


class Hung(BaseException):
    """Raised by the watchdog; a BaseException so no `except Exception` in the code swallows it."""


# ---------------------------------------------------------------------------------------------- running

@contextlib.contextmanager
def watchdog(seconds: float):
    """Raise Hung in the main thread after ``seconds``, and every second after that (an exception raised while
    a finalizer runs is dropped); restores pytest-timeout's own alarm afterwards."""
    def fire(signum, frame):
        raise Hung

    old_handler = signal.signal(signal.SIGALRM, fire)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 0.001), old_interval)


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM):
    """Cap the address space at its present size plus ``headroom`` (a shared machine has no swap to spare)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = size + headroom if hard == resource.RLIM_INFINITY else min(size + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def invoke(call) -> tuple[int | None, str, str, str | None]:
    """(exit code, stdout, stderr, problem) of ``call()`` (returning an exit code) in this process."""
    from compress.errors import CompressError

    out, err = io.StringIO(), io.StringIO()
    code, problem = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with memory_cap(), watchdog(HANG_S):
                code = call()
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except CompressError as e:  # compress.load called directly
            print(f"error: {e}", file=err)
            code = 2
        except Hung:
            problem = f"hung: no answer after {HANG_S} s"
        except BaseException as e:  # noqa: BLE001 - any other exception is what the fuzzing looks for
            lines = traceback.format_exception(e)
            problem = f"uncaught {type(e).__name__}: {e}\n" + "".join(lines[-6:])
    return code, out.getvalue(), err.getvalue(), problem


def run_cli(argv: list[str]):
    from compress.cli import main

    return lambda: main(argv)


def run_load(path: str):
    import compress

    def call():
        compress.load(path, device="cpu")
        return 0
    return call


# ---------------------------------------------------------------------------------------------- states

def entry_state(p: Path, content: bool = True):
    """What a file system entry is, links not followed: type plus content hash (or size and mtime)."""
    try:
        s = os.lstat(p)
    except OSError:  # missing, below a file, or a name too long
        return None
    if stat.S_ISLNK(s.st_mode):
        return ("link", os.readlink(p))
    if stat.S_ISDIR(s.st_mode):
        return ("dir", s.st_mode) if content else ("dir", s.st_mode, s.st_mtime_ns)
    if stat.S_ISREG(s.st_mode):
        if not content:
            return ("file", s.st_mode, s.st_size, s.st_mtime_ns)
        try:
            return ("file", s.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
        except OSError as e:
            return ("file", s.st_mode, f"unreadable {e.errno}")
    return ("special", stat.S_IFMT(s.st_mode), s.st_rdev)


def tree_state(root: Path, content: bool = True, skip: Path | None = None) -> dict[str, tuple]:
    """relative path -> entry_state for ``root`` and everything below it, without following links."""
    root = Path(root)
    state = {}
    top = entry_state(root, content)
    if top is None:
        return state
    state["."] = top
    if top[0] != "dir":
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            state[str(p.relative_to(root))] = entry_state(p, content)
    return state


def diff(before: dict, after: dict) -> list[str]:
    changed = [k for k in before if k in after and before[k] != after[k]]
    return ([f"removed {k}" for k in before if k not in after] + [f"changed {k}" for k in changed]
            + [f"added {k}" for k in after if k not in before])


# ---------------------------------------------------------------------------------------------- scratch

def expand(arg: str, scratch: Path, inp: Path, out: str | None, assets: Path) -> str:
    return (arg.replace("@IN", str(inp)).replace("@OUT", out if out is not None else "")
            .replace("@S", str(scratch)).replace("@A", str(assets)))


def check_output(kind: str, out: Path) -> str | None:
    """None when the output of a successful run is there and readable, else what is wrong."""
    if kind == "gguf":
        with open(out, "rb") as f:
            return None if f.read(4) == b"GGUF" else "the output is not a GGUF file"
    if kind == "report":
        json.loads((out / "report.json").read_text())
        return None
    if kind == "exists":
        return None if out.exists() else "the output does not exist"
    code, _, err, problem = invoke(lambda: _load_output(out))
    return problem or (f"the output does not load: {err.strip()}" if code else None)


def _load_output(out: Path) -> int:
    import compress

    compress.load(out, device="cpu", trust_remote_code=True)  # a structured-pruned BERT ships pruned_bert.py
    return 0


LAST: dict = {}  # exit code and stderr of the latest run, for whoever wants to read what the commands said


def check(ex: Example, models: dict[str, Path], root: Path, base: Path) -> list[str]:
    """Run ``ex`` in a fresh scratch folder below ``root``; the contract violations found (none: passed)."""
    scratch = Path(tempfile.mkdtemp(dir=root, prefix="ex-"))
    inp = scratch / "in" / "model"
    shutil.copytree(models[ex.arch], inp)
    (scratch / "work").mkdir()
    write_data_files(scratch / "data")
    for step, value in ex.setup:
        {"config": damage_config, "checkpoint": damage_checkpoint}[step](inp, value)
    assets = models["@A"]

    def build_previous(target: Path):
        argv = [expand(a, scratch, inp, str(target), assets) for a in ex.argv]
        code, _, err, problem = invoke(run_cli(argv))
        assert code == 0 and problem is None, f"making the previous output failed: {problem or err}"

    out = make_out(ex.out, scratch, inp, build_previous, ex.suffix) if ex.out else None
    argv = list(ex.argv)
    if ex.out == "omitted":  # the command's default output name, in the working folder
        at = argv.index("--out")
        del argv[at:at + 2]
    argv = [expand(a, scratch, inp, out, assets) for a in argv]
    sides = {}
    for flag, kind in ex.side:
        ext = "json" if flag == "--json" else "png"
        sides[flag] = expand(SIDE_TARGETS[kind].format(ext=ext), scratch, inp, out, assets)
        argv += [flag, sides[flag]]
    if ex.overwrite and ex.argv[0] != "eval":
        argv.append("--overwrite")
    out_path = Path(scratch / "work", out) if out else None  # "" counts as not given
    abs_out = Path(os.path.abspath(out_path)) if out_path is not None else None

    before_input = tree_state(inp)
    before_scratch = tree_state(scratch)
    before_out = tree_state(abs_out) if abs_out else {}
    before_outside = tree_state(base, content=False, skip=scratch)
    cwd = os.getcwd()
    os.chdir(scratch / "work")
    try:
        call = run_load(argv[1]) if ex.argv[0] == "load" else run_cli(argv)
        code, _, stderr, problem = invoke(call)
    finally:
        os.chdir(cwd)
    LAST.update(code=code, stderr=stderr, problem=problem)
    problems = [problem] if problem else []
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code is not None and code not in (0, 2):
        problems.append(f"exit code {code}: {stderr.strip()[-2000:]}")
    if code == 2 and not (len(lines) == 1 and lines[0].startswith("error: ")):
        problems.append(f"exit 2 without a one-line 'error: ' message: {stderr.strip()[-2000:]!r}")
    if tree_state(inp) != before_input:
        problems.append(f"the input folder changed: {diff(before_input, tree_state(inp))[:5]}")
    outside = diff(before_outside, tree_state(base, content=False, skip=scratch))
    if outside:
        problems.append(f"touched outside the scratch folder: {outside[:5]}")
    after_scratch = tree_state(scratch)
    excused = {str(Path(v).relative_to(scratch)) for v in sides.values() if Path(v).is_relative_to(scratch)}
    if abs_out is not None and abs_out.is_relative_to(scratch):
        rel_out = str(abs_out.relative_to(scratch)) if abs_out != scratch else "."
        excused |= {k for k in before_scratch if k == rel_out or k.startswith(rel_out + "/") or rel_out == "."}
    changed = [d for d in diff(before_scratch, after_scratch) if not d.startswith("added ") and d.split(" ", 1)[1] not in excused]
    if changed:
        problems.append(f"changed what was already in the scratch folder: {changed[:5]}")
    # a temporary is a .tmp-/.old- name anywhere, or a hidden entry new in a folder that was there before
    leftovers = [k for k in after_scratch if k not in before_scratch and (
        any(m in Path(k).name for m in TMP_MARKERS)
        or Path(k).name.startswith(".") and str(Path(k).parent) in before_scratch
        and not (abs_out is not None and (scratch / k).is_relative_to(abs_out)))]
    if leftovers:
        problems.append(f"left temporaries: {leftovers[:5]}")
    if code != 0 or problem:
        if abs_out is not None and tree_state(abs_out) != before_out:
            problems.append(f"failed but left something at --out {out!r}")
        parents = {str(p.relative_to(scratch)) for p in (abs_out.parents if abs_out else []) if p.is_relative_to(scratch)}
        new = [k for k in after_scratch if k not in before_scratch and not (k in parents and after_scratch[k][0] == "dir")
               and not (abs_out and scratch / k == abs_out)]
        if new:
            problems.append(f"failed but left new files: {new[:5]}")
    if ex.must_refuse and code == 0 and not problem:
        problems.append(f"accepted although {ex.must_refuse}")
    if ex.must_succeed and code != 0 and not problem:
        problems.append(f"refused a valid run: {stderr.strip()[-500:]}")
    if code == 0 and not problem:
        if ex.check and abs_out is not None:
            if entry_state(abs_out) is None:
                problems.append("exit 0 but nothing at --out")
            elif not (ex.check == "gguf" and not abs_out.is_file()):
                bad = check_output(ex.check, abs_out)
                if bad:
                    problems.append(bad)
        if "--json" in sides and entry_state(Path(sides["--json"])) and Path(sides["--json"]).is_file():
            try:
                json.loads(Path(sides["--json"]).read_text())
            except ValueError:
                problems.append(f"--json {sides['--json']} is not JSON")
    for p in scratch.rglob("*"):  # a run may leave a folder without write or search permission
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    shutil.rmtree(scratch, ignore_errors=True)
    return problems


def report(ex: Example, problems: list[str]) -> str:
    return f"{' '.join(ex.argv)} [arch {ex.arch}, setup {ex.setup}, out {ex.out}, overwrite {ex.overwrite}, " \
           f"side {ex.side}]:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The two input models, and (under "@A") a folder of models the commands may read but never write."""

    shared = tmp_path_factory.mktemp("fuzz-shared")
    shutil.copytree(tiny_model("llama"), shared / "llama")
    shutil.copytree(tiny_model("bert"), shared / "bert")
    tiny.build("llama", shared / "llama-seed1", seed=1)
    for name in ("llama", "bert", "llama-seed1"):  # round-to-nearest in the GPTQ format, 4 bits, groups of 32
        argv = ["quantize", "--method", "rtn", "--group-size", "32", "--model", str(shared / name),
                "--out", str(shared / f"{name}-gptq"), *NO_EVAL]
        assert invoke(run_cli(argv))[0] == 0
    return {"llama": tiny_model("llama"), "bert": tiny_model("bert"), "@A": shared}


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> tuple[Path, Path]:
    return tmp_path_factory.mktemp("fuzz"), tmp_path_factory.getbasetemp()


def pinned(examples: list[Example]):
    """Run ``examples`` first, then the drawn ones (hypothesis's @example, once per item)."""
    def decorate(test):
        for ex in reversed(examples):
            test = example(ex=ex)(test)
        return test
    return decorate


def run_once(ex: Example, seen: set, models, fuzz_root) -> None:
    """Check ``ex`` unless an identical example ran already (generation repeats some)."""
    key = repr(ex)
    if key in seen:
        return
    seen.add(key)
    problems = check(ex, models, *fuzz_root)
    assert not problems, report(ex, problems)


@pytest.fixture(scope="module")
def seen() -> set:
    return set()


@fuzz_settings(150)
@pinned(PINNED_DAMAGED)
@given(ex=damaged_model_examples())
def test_damaged_model_folders_are_refused_cleanly(ex, seen, models, fuzz_root):
    run_once(ex, seen, models, fuzz_root)


@fuzz_settings(90)
@pinned(PINNED_FLAGS)
@given(ex=flag_examples())
def test_flag_combinations_succeed_or_are_refused_cleanly(ex, seen, models, fuzz_root):
    run_once(ex, seen, models, fuzz_root)


@fuzz_settings(90)
@given(ex=output_path_examples())
def test_output_paths_never_harm_what_is_there(ex, seen, models, fuzz_root):
    run_once(ex, seen, models, fuzz_root)
