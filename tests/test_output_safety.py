"""Output paths: --overwrite replaces only what compress wrote; inputs, links, special files and protected
folders are refused with one sentence (exit 2) before any work; concurrent and interrupted runs leave
nothing behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from compress.errors import CompressError
from compress.outputs import (OUTPUT_MARKER, atomic_output, check_output, checkpoints_in, remove_checkpoints,
                              remove_stale_temporaries, written_by_compress)
from test_cli import assert_clean_error

RTN = ["quantize", "--method", "rtn", "--no-eval", "--device", "cpu"]
QUICK = ["--eval-tokens", "256", "--eval-samples", "16", "--eval-seqlen", "64", "--repeats", "1", "--no-latency"]
TRAIN = ["--steps", "2", "--batch-size", "4", "--max-length", "32", "--device", "cpu", "--no-train-eval",
         "--max-samples", "32", "--no-eval"]


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """compress.cli.main in this process, as a CompletedProcess (no interpreter start-up per case)."""
    from compress.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture
def model(tiny_model, tmp_path):
    """A private copy of a tiny model in tmp_path/work/model (the tests aim outputs at it)."""
    return Path(shutil.copytree(tiny_model("llama"), tmp_path / "work" / "model"))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_outputs_around_the_input_are_refused_and_the_input_is_unchanged(model, tmp_path, capsys, hash_tree):
    alias = tmp_path / "alias"
    alias.symlink_to(model.parent)  # another spelling of the same folder
    before = hash_tree(tmp_path)
    cases = [
        ([*RTN, "--model", model, "--out", model, "--overwrite"], "is the input"),
        ([*RTN, "--model", model, "--out", model.parent, "--overwrite"], "contains the input"),
        ([*RTN, "--model", model, "--out", tmp_path, "--overwrite"], "contains the input"),
        ([*RTN, "--model", model, "--out", model / "sub"], "is inside the input"),
        ([*RTN, "--model", model, "--out", alias / "model", "--overwrite"], "is the input"),
        ([*RTN, "--model", model, "--out", tmp_path / "q", "--json", model / "config.json"], "is inside the input"),
        ([*RTN, "--model", model, "--out", tmp_path / "q", "--plot", model / "p.png"], "is inside the input"),
        (["prune", "--model", model, "--out", model, "--overwrite", "--no-eval"], "is the input"),
        (["eval", "--model", model, "--out", model.parent], "contains the input"),
        (["export", "gguf", "--model", model, "--out", model / "m.gguf"], "is inside the input"),
        (["distill", "--teacher", model, "--out", model, "--overwrite", "--no-eval"], "is the input"),
        (["distill", "--teacher", model, "--out", tmp_path / "s", "--checkpoints", model, "--no-eval"], "is the input"),
        (["qat", "--model", model, "--data", "builtin", "--out", model.parent, "--overwrite"], "contains the input"),
        (["qat", "--model", model, "--lora", "--data", "builtin", "--out", model, "--overwrite"], "is the input"),
    ]
    for args, fragment in cases:
        proc = cli(capsys, *args)
        assert_clean_error(proc, fragment)
        assert hash_tree(tmp_path) == before, f"{args}: something was written"


def test_protected_places_special_files_and_links_are_refused(model, tmp_path, capsys, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    gguf_fifo = tmp_path / "fifo.gguf"
    os.mkfifo(gguf_fifo)
    made = tmp_path / "made"
    assert cli(capsys, *RTN, "--model", model, "--out", made).returncode == 0
    link = tmp_path / "link"
    link.symlink_to(made)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [
        (".", "is the current folder"),
        ("..", "contains the current folder"),
        (str(home), "is your home folder"),
        ("/", "file system root"),
        (fifo, "special file"),
        (link, "symbolic link"),
        (dangling, "symbolic link"),
    ]
    for out, fragment in cases:
        assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", out, "--overwrite"), fragment)
    assert_clean_error(cli(capsys, "export", "gguf", "--model", model, "--out", gguf_fifo, "--overwrite"), "special file")
    json_fifo = tmp_path / "r.json"
    os.mkfifo(json_fifo)
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", tmp_path / "q", "--json", json_fifo), "special file")
    assert link.is_symlink() and written_by_compress(made)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".made", ".link", ".q"))]
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can be tempted to replace /dev/null")
def test_dev_null_is_never_replaced(model, capsys):
    before = os.stat("/dev/null")
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", "/dev/null", "--overwrite"), "special file")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_overwrite_replaces_only_compress_outputs_or_empty_folders(model, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", foreign, "--overwrite"), "did not write")
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", foreign), "did not write")
    assert_clean_error(cli(capsys, "eval", "--model", model, "--out", foreign), "did not write")
    made = tmp_path / "made"
    assert cli(capsys, *RTN, "--model", model, "--out", made).returncode == 0
    assert_clean_error(cli(capsys, "eval", "--model", model, "--out", made), "another compress command")
    assert (foreign / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", a_file, "--overwrite"), "is a file")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", empty), "--overwrite")
    assert cli(capsys, *RTN, "--model", model, "--out", empty, "--overwrite").returncode == 0
    assert json.loads((empty / OUTPUT_MARKER).read_text())["command"] == "quantize"
    (empty / "added-later.txt").write_text("x")  # still compress's output: replaced whole
    assert cli(capsys, *RTN, "--model", model, "--out", empty, "--overwrite").returncode == 0
    assert not (empty / "added-later.txt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_gguf_and_reports_carry_the_marker(model, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli(capsys, "export", "gguf", "--model", model, "--out", out, "--type", "f32").returncode == 0
    assert written_by_compress(out)
    assert_clean_error(cli(capsys, "export", "gguf", "--model", model, "--out", out), "--overwrite")
    assert cli(capsys, "export", "gguf", "--model", model, "--out", out, "--overwrite").returncode == 0
    foreign = tmp_path / "other.gguf"
    foreign.write_bytes(b"GGUF" + bytes(60))
    assert_clean_error(cli(capsys, "export", "gguf", "--model", model, "--out", foreign, "--overwrite"), "not written by compress")
    import gguf  # a well-formed GGUF that another tool wrote (no marker in its metadata) is not replaced either

    theirs_gguf = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(str(theirs_gguf), "llama")
    writer.add_string("general.name", "someone else's")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not written_by_compress(theirs_gguf)
    assert_clean_error(cli(capsys, "export", "gguf", "--model", model, "--out", theirs_gguf, "--overwrite"),
                       "not written by compress")

    report, plot = tmp_path / "r.json", tmp_path / "r.svg"
    for _ in range(2):  # a report compress wrote is replaced by the next one
        proc = cli(capsys, "eval", "--model", model, "--json", report, "--plot", plot, "--out", tmp_path / "rep", *QUICK)
        assert proc.returncode == 0, proc.stderr
    assert written_by_compress(report) and written_by_compress(plot) and written_by_compress(tmp_path / "rep")
    assert written_by_compress(tmp_path / "rep" / "report.png")
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": 1}\n')
    assert_clean_error(cli(capsys, "eval", "--model", model, "--json", theirs, *QUICK), "not written by compress")
    assert theirs.read_text() == '{"mine": 1}\n'


def test_bad_report_and_output_paths_are_found_before_anything_is_written(model, tmp_path, capsys, monkeypatch):
    q = tmp_path / "q"
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cases = [
        (["--json", tmp_path / "missing" / "r.json"], "does not exist"),
        (["--json", tmp_path / "r.txt"], "must end in .json"),
        (["--plot", tmp_path / "r.jpg"], "must end in .png or .pdf or .svg"),
        (["--plot", tmp_path / "missing" / "r.png"], "does not exist"),
        (["--json", blocker / "r.json"], "is not a folder"),
    ]
    for extra, fragment in cases:
        assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", q, *extra), fragment)
        assert not q.exists()
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", blocker / "q"), "is not a folder")
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", tmp_path / ("n" * 300)), "longer than")
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", tmp_path / ("n" * 240)), "longer than")
    monkeypatch.setenv("COMPRESS_OFFLOAD_DIR", str(blocker))
    assert_clean_error(cli(capsys, "quantize", "--model", model, "--out", q, "--offload", "--no-eval"),
                       "COMPRESS_OFFLOAD_DIR")
    monkeypatch.setenv("COMPRESS_CACHE", str(blocker / "cache"))  # the built-in corpus is cached under a file
    assert_clean_error(cli(capsys, "quantize", "--model", model, "--out", q, "--nsamples", "2", "--seqlen", "16",
                           "--no-eval"), "cannot write compress's data cache", "COMPRESS_CACHE")
    assert not q.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "work"]


@pytest.fixture
def locked_folder(tmp_path):
    """A folder nothing may be written into: by its mode, or for root (whom modes do not stop) a read-only mount."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:
        yield locked
        locked.chmod(0o700)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root may write into any folder, and a read-only mount was refused ({mounted.stderr.strip()!r})")
    try:
        yield locked
    finally:
        subprocess.run(["umount", str(locked)], check=True)


def test_read_only_folder_is_refused(model, locked_folder, capsys):
    assert_clean_error(cli(capsys, *RTN, "--model", model, "--out", locked_folder / "q"), "not writable")


def test_checkpoint_folders_hold_only_what_compress_wrote(model, tmp_path, capsys, hash_tree):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    before = hash_tree(theirs)
    for command in (["distill", "--teacher", model, "--task", "causal"], ["qat", "--model", model, "--data", "builtin"]):
        proc = cli(capsys, *command, "--out", tmp_path / "out", "--checkpoints", theirs, "--no-eval")
        assert_clean_error(proc, "did not write")
    assert hash_tree(theirs) == before

    # cleanup removes checkpoint-N and final, and the folder only when compress created it
    users = tmp_path / "users"
    (users / "checkpoint-2").mkdir(parents=True)
    (users / "final").mkdir()
    remove_checkpoints(users)
    assert users.is_dir() and not any(users.iterdir())
    ours = tmp_path / "ours"
    with checkpoints_in(ours):
        (ours / "checkpoint-1").mkdir()
    remove_checkpoints(ours)
    assert not ours.exists()
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError), checkpoints_in(failed):
        raise RuntimeError  # failed before any checkpoint: the folder compress made goes
    assert not failed.exists()


def test_qat_keeps_checkpoints_when_asked_and_leaves_the_users_folder(model, tmp_path, capsys):
    kept = tmp_path / "kept"
    proc = cli(capsys, "qat", "--model", model, "--data", "builtin", *TRAIN, "--save-steps", "1", "--out", kept,
               "--keep-checkpoints")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "kept.checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    users = tmp_path / "users-checkpoints"
    users.mkdir()
    proc = cli(capsys, "qat", "--model", model, "--data", "builtin", *TRAIN, "--save-steps", "1",
               "--out", tmp_path / "plain", "--checkpoints", users)
    assert proc.returncode == 0, proc.stderr
    assert users.is_dir() and not any(users.iterdir())  # its checkpoints are gone, the folder it made stays


def test_qat_lora_refusal_leaves_no_base_and_the_rerun_works(model, tmp_path, capsys):
    out = tmp_path / "adapters"
    lora = ["qat", "--model", model, "--lora", "--bits", "4", "--group-size", "32", "--lora-rank", "2", *TRAIN,
            "--out", out]
    assert_clean_error(cli(capsys, *lora, "--data", tmp_path / "missing.txt"), "missing.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no adapters-base-w4 left behind
    proc = cli(capsys, *lora, "--data", "builtin")
    assert proc.returncode == 0, proc.stderr
    assert written_by_compress(out) and written_by_compress(tmp_path / "adapters-base-w4")


def test_a_second_concurrent_writer_is_refused(tmp_path):
    out = tmp_path / "result"
    inside, release, errors = threading.Event(), threading.Event(), []

    def first():
        with atomic_output(out) as tmp:
            (tmp / "a").write_text("first")
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(30)
    try:
        with pytest.raises(CompressError, match=r"another compress run \(process \d+\) is writing"):
            with atomic_output(out, overwrite=True):
                errors.append("entered")
    finally:
        release.set()
        thread.join()
    assert not errors and (out / "a").read_text() == "first"
    # an output that appears while a run writes (not through compress) is not replaced without --overwrite
    other = tmp_path / "other"
    with pytest.raises(CompressError, match="appeared while this run was writing it"):
        with atomic_output(other) as tmp:
            (tmp / "b").write_text("late")
            other.mkdir()
            (other / "theirs").write_text("x")
    assert [p.name for p in other.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "result"]


def test_concurrent_processes_cannot_both_win(tiny_model, tmp_path):
    src = tiny_model("gpt2")
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "compress", *RTN, "--model", str(src), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "already exists" in err or "another compress run" in err or "appeared while" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    out = tmp_path / "result"
    stale = [tmp_path / f".result.tmp-{dead}-0123abcd", tmp_path / f".result.work-{dead}-89abcdef"]
    for path in stale:
        path.mkdir()
        (path / "part").write_text("x")
    (tmp_path / f".result.tmp-{dead}-00000000.json").write_text("x")
    running = tmp_path / f".result.tmp-{live}-fedcba98"
    running.mkdir()
    (tmp_path / ".result.claim").write_text(json.dumps({"pid": dead}))  # a claim left by a killed run
    unrelated = tmp_path / ".resultant.tmp-1-00000000"
    unrelated.mkdir()
    with atomic_output(out) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, unrelated.name, "result"])
    # a run killed between its two renames: the output it had moved aside is put back
    shutil.rmtree(out)
    moved = tmp_path / f".result.old-{dead}-11111111"
    moved.mkdir()
    (moved / "a").write_text("previous")
    remove_stale_temporaries(out)
    assert (out / "a").read_text() == "previous" and not moved.exists()


def _start_gptq(model: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "compress", "quantize", "--method", "gptq", "--model", str(model), "--out", str(out),
           "--nsamples", "32", "--seqlen", "64", "--no-eval", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    return proc


def test_sigint_and_sigterm_clean_up_and_sigkill_is_cleaned_by_the_rerun(model, tmp_path, capsys):
    out = tmp_path / "q"
    for sig, code, line in ((signal.SIGINT, 130, "interrupted; no partial output was left"),
                            (signal.SIGTERM, 143, "terminated; no partial output was left")):
        proc = _start_gptq(model, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert err.strip().splitlines() == [line]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]

    proc = _start_gptq(model, out)
    proc.kill()
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert any(p.name.startswith(".q.tmp-") for p in tmp_path.iterdir())  # what a killed process leaves
    assert cli(capsys, *RTN, "--model", model, "--out", out).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "work"]


def test_library_checks_name_the_path(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CompressError, match="is inside the input"):
        check_output(tmp_path / "a" / "b", inputs=[tmp_path / "a"])
    with pytest.raises(CompressError, match="must end in .json"):
        check_output(tmp_path / "r.txt", is_file=True, suffixes=(".json",), what="--json file")
    assert check_output(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_folders_made_for_a_failed_output_are_removed(tmp_path):
    """A run that fails leaves no trace of its output: not even the folders made to hold it."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "kept" / "a" / "b" / "out") as tmp:
            (tmp / "weights.bin").write_bytes(b"0")
            raise RuntimeError("the run failed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
    with atomic_output(tmp_path / "kept" / "a" / "out") as tmp:
        (tmp / "weights.bin").write_bytes(b"0")
    assert (tmp_path / "kept" / "a" / "out" / "weights.bin").is_file()
