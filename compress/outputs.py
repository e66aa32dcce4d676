"""Where compress may write, and how: one rule for every output, checkpoint folder and scratch folder.

The rule: compress writes a new path, or with --overwrite replaces (a) an output it wrote itself,
recognised by its marker, or (b) an empty folder; never an input or a folder around or inside one,
a symbolic link, a special file, the current folder or its ancestors, the root or the home folder.

- :func:`check_output` says whether a path may be written (one sentence when not); commands call it
  for every output flag before any work.
- :func:`atomic_output` builds an output in a temporary sibling, claimed against concurrent runs, and
  renames it into place, so an interrupted or failed run leaves either nothing or a complete result;
  :func:`remove_stale_temporaries` clears what runs that died left beside an output.
- :func:`written_by_compress` recognises the marker in a folder, a --json report, a GGUF file or a plot.
- :func:`check_checkpoints`, :func:`checkpoints_in`, :func:`remove_checkpoints`: training checkpoint
  folders, of which compress removes only what it wrote; :func:`scratch_folder` and
  :func:`offload_folder` for working space.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from .errors import CompressError


OUTPUT_MARKER = ".compress-output"  # in every output folder: {"tool": "compress", "version", "command"}
REPORT_KEY = "compress_output"  # the same marker, as a top-level key of a --json report
GGUF_MARKER_KEY = "compress.output"  # the same marker, as a GGUF metadata string (JSON)
PLOT_MARK = "compress-output"  # a plot's Creator metadata starts with it (PNG, PDF and SVG keep it as text)
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
# temporary siblings: .NAME.tmp-PID-HEX (the output being built), .NAME.old-PID-HEX (the output being
# replaced), .NAME.work-PID-HEX (scratch); the PID tells a rerun whether their owner is still running
_TEMPORARY = re.compile(r"(tmp|old|work)-(\d+)-[0-9a-f]{8}(\.\w+)?")
_TEMPORARY_ROOM = 24  # bytes a temporary name adds to the output's name, besides a file's suffix
_CHECKPOINT_ENTRY = re.compile(r"checkpoint-\d+|final|" + re.escape(OUTPUT_MARKER))


def output_marker(command: str | None) -> dict:
    """The marker compress writes into every output: {"tool": "compress", "version", "command"}."""
    from . import __version__

    return {"tool": "compress", "version": __version__, "command": command}


def written_by_compress(path: str | Path, command: str | None = None) -> bool:
    """True when ``path`` is an output compress wrote (by ``command``, when given): a folder holding its
    marker file, a --json report with its marker key, a GGUF file with its marker metadata, or a --plot
    file with its marker (plots come from reports alone, so their command is not checked)."""
    path = Path(path)
    try:
        if path.is_symlink():
            return False
        if path.is_dir():
            marker = path / OUTPUT_MARKER
            return marker.is_file() and not marker.is_symlink() and _ours(json.loads(marker.read_text()), command)
        if not path.is_file():
            return False
        suffix = path.suffix.lower()
        if suffix == ".json" and path.stat().st_size < 64 * 1024**2:
            data = json.loads(path.read_text())
            return isinstance(data, dict) and _ours(data.get(REPORT_KEY), command)
        if suffix == ".gguf":
            return _ours(json.loads(gguf_metadata_string(path, GGUF_MARKER_KEY) or "null"), command)
        if suffix in PLOT_SUFFIXES:
            with open(path, "rb") as f:
                return PLOT_MARK.encode() in f.read(16 * 1024**2)
    except (OSError, ValueError, IndexError, KeyError, RecursionError):
        return False
    return False


def _ours(marker, command: str | None) -> bool:
    return isinstance(marker, dict) and marker.get("tool") == "compress" and command in (None, marker.get("command"))


def gguf_metadata_string(path: str | Path, key: str) -> str | None:
    """The string value of ``key`` in a GGUF file's metadata (None when absent, or when the gguf package,
    which every GGUF compress writes needs, is not installed)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    field = GGUFReader(path).get_field(key)
    value = field.contents() if field is not None else None
    return value if isinstance(value, str) else None


def check_output(out: str | Path, *, inputs=(), overwrite: bool = False, is_file: bool = False,
                 suffixes: tuple[str, ...] = (), what: str = "output", parent_must_exist: bool = False,
                 replaces: str | None = None, accept=None) -> Path:
    """Refuse an output path compress must not write, as one CompressError sentence; return it absolute.

    Args:
        out: the path to be written (a folder, or a file when ``is_file``).
        inputs: paths the run reads (model folders, data files); ``out`` may not be one of them, contain
            one or lie inside one. Paths that do not exist (``builtin``, ``hf:NAME``) are ignored.
        overwrite: an existing ``out`` may be replaced, if compress wrote it or it is an empty folder.
        replaces: only an output of this compress command may be replaced (reports: ``eval``).
        suffixes: the endings ``out`` must have (lower case, with the dot).
        what: how the sentence names the path (``output``, ``--json file``, ...).
        parent_must_exist: refuse a missing parent folder instead of creating it later.
        accept: ``accept(path) -> bool`` for an existing folder, instead of "written by compress or empty".
    """
    if out is None or not str(out).strip():
        raise CompressError(f"the {what} path is empty")
    out = Path(os.path.abspath(Path(out).expanduser()))
    if suffixes and out.suffix.lower() not in suffixes:
        raise CompressError(f"{what} {out} must end in {' or '.join(suffixes)}")
    nearest = out.parent
    while not os.path.lexists(nearest):
        nearest = nearest.parent
    _check_length(out, nearest, (len(out.suffix.encode()) if is_file else 0) + _TEMPORARY_ROOM, what)
    if out.is_symlink():
        raise CompressError(f"{what} {out} is a symbolic link; compress never writes through links: give a real path")
    real = Path(os.path.realpath(out))
    _check_protected(out, real, what)
    if not nearest.is_dir():
        raise CompressError(f"cannot write {what} {out}: {nearest} is not a folder")
    if parent_must_exist and nearest != out.parent:
        raise CompressError(f"cannot write {what} {out}: the folder {out.parent} does not exist")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise CompressError(f"cannot write {what} {out}: the folder {nearest} is not writable")
    for given in inputs:
        relation = _relation(real, given)
        if relation:
            raise CompressError(f"{what} {out} {relation} {given}; inputs are only read: choose another path")
    if os.path.lexists(out):
        _check_existing(out, is_file, overwrite, what, replaces, accept)
    return out


def _check_length(out: Path, nearest: Path, room: int, what: str) -> None:
    name_max = _pathconf(nearest, "PC_NAME_MAX", 255)
    for part in out.relative_to(nearest).parts:
        if len(os.fsencode(part)) + (room if part == out.name else 0) > name_max:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise CompressError(f"cannot write {what}: the name {shown} is longer than the {name_max - room} bytes "
                                f"this file system allows for it (compress adds a temporary suffix); choose a shorter name")
    path_max = _pathconf(nearest, "PC_PATH_MAX", 4096)
    if len(os.fsencode(out)) + room >= path_max:
        raise CompressError(f"cannot write {what}: its path is longer than the {path_max} bytes this file system allows")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def _check_protected(out: Path, real: Path, what: str) -> None:
    """The root, the home folder and the current folder (or a folder around them) are never outputs."""
    places = []
    with contextlib.suppress(OSError):
        places.append((Path(os.path.realpath(os.getcwd())), "the current folder"))
    with contextlib.suppress(RuntimeError, KeyError):
        places.append((Path(os.path.realpath(Path.home())), "your home folder"))
    if real == Path(real.anchor):
        raise CompressError(f"{what} {out} is the file system root; compress never writes an output there")
    for place, name in places:
        if real == place or real in place.parents:
            where = name if real == place else f"a folder that contains {name}"
            raise CompressError(f"{what} {out} is {where}; compress never replaces it: choose a new path")


def _relation(real: Path, given) -> str | None:
    """How ``real`` stands to the input ``given``: 'is the input', 'contains the input', 'is inside the input'."""
    if given is None or not str(given).strip():
        return None
    path = Path(given).expanduser()
    if not os.path.lexists(path):
        return None
    other = Path(os.path.realpath(path))
    if real == other:
        return "is the input"
    if real in other.parents:
        return "contains the input"
    if other in real.parents:
        return "is inside the input"
    return None


def _check_existing(out: Path, is_file: bool, overwrite: bool, what: str, replaces: str | None, accept) -> None:
    if not (out.is_dir() or out.is_file()):
        raise CompressError(f"{what} {out} is a special file (a device, FIFO or socket); compress writes only "
                            f"regular files and folders: choose another path")
    if is_file and out.is_dir():
        raise CompressError(f"{what} {out} is a folder, but a file is written there: choose another path")
    if not is_file and out.is_file():
        raise CompressError(f"{what} {out} is a file, but a folder is written there: choose another path")
    if accept is not None and out.is_dir():
        ours = accept(out)
    else:
        ours = written_by_compress(out, replaces) or _empty_folder(out)
    if not ours and replaces and written_by_compress(out):
        raise CompressError(f"{what} {out} was written by another compress command; compress {replaces} replaces "
                            f"only its own earlier output or an empty folder: choose another path")
    if not ours:
        held = "holds files compress did not write" if out.is_dir() else "was not written by compress"
        raise CompressError(f"{what} {out} {held}; compress replaces only its own outputs and empty folders: "
                            f"choose another path or remove it yourself")
    if not overwrite:
        raise CompressError(f"{what} {out} already exists; pass --overwrite to replace it")


def _empty_folder(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, is_file: bool = False, *, inputs=(),
                  command: str | None = None, replaces: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success it replaces ``out``.

    ``out`` is checked by :func:`check_output` (``inputs``, ``overwrite``, ``replaces``) on entry and again before
    the rename. A claim beside ``out`` (``.NAME.claim``, an exclusive lock the system releases when the
    process dies) lets one run at a time write it; a second run fails with one sentence. Temporary
    siblings left by runs that died are removed first. A folder output gets the marker file (with
    ``command``); a file output's writer embeds the marker itself. On any exception the temporary is
    removed and ``out`` is left as it was.
    """
    out = check_output(out, inputs=inputs, overwrite=overwrite, is_file=is_file, replaces=replaces)
    created = [p for p in (out.parent, *out.parent.parents) if not os.path.lexists(p)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompressError(f"cannot create the output folder {out.parent} ({e.strerror})") from None
    existed = os.path.lexists(out)
    committed = False
    try:
        with _claim(out):
            remove_stale_temporaries(out)
            tmp = _temporary(out, "tmp", is_file)
            try:
                yield tmp
                if not is_file:
                    (tmp / OUTPUT_MARKER).write_text(json.dumps(output_marker(command)) + "\n")
                if not existed and os.path.lexists(out) and not overwrite:
                    raise CompressError(f"output {out} appeared while this run was writing it; nothing was replaced "
                                        f"(pass --overwrite to replace it)")
                check_output(out, inputs=inputs, overwrite=overwrite, is_file=is_file, replaces=replaces)
                _commit(tmp, out)
                committed = True
            finally:
                _remove(tmp)
    finally:
        if not committed:  # the folders made for a failed output go too (innermost first), if still empty
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _commit(tmp: Path, out: Path) -> None:
    if tmp.is_file() or not os.path.lexists(out):
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


@contextlib.contextmanager
def _claim(out: Path) -> Iterator[None]:
    """Hold ``.NAME.claim`` beside ``out``: an exclusive lock that the system drops if the process dies."""
    import fcntl

    path = out.parent / f".{out.name}.claim"
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise CompressError(f"cannot claim {out}: {path} cannot be opened ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _claim_pid(fd)
            os.close(fd)
            by = f" (process {holder})" if holder else ""
            raise CompressError(f"another compress run{by} is writing {out}; wait for it to end or choose "
                                f"another path") from None
        except OSError:
            pass  # a file system without locks: the check before the rename still guards a new output
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed this claim while we opened it: take a fresh one
    else:
        raise CompressError(f"cannot claim {out}: other runs keep taking it; try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "output": str(out)}).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _claim_pid(fd: int) -> int | None:
    try:
        return int(json.loads(os.pread(fd, 4096, 0) or b"{}").get("pid"))
    except (OSError, ValueError, TypeError):
        return None


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` whose compress process is no longer running.

    A replaced output moved aside by a run that died between its two renames is put back when ``out``
    itself is missing. Temporaries of a live run are never touched. Returns the paths removed.
    """
    out = Path(out).absolute()
    prefix = f".{out.name}."
    removed = []
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if match is None or process_running(int(match.group(2))):
            continue
        path = out.parent / name
        if match.group(1) == "old" and not os.path.lexists(out):
            os.replace(path, out)
            continue
        _remove(path)
        removed.append(path)
    return removed


def process_running(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (on another user's process too)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _temporary(out: Path, kind: str, is_file: bool) -> Path:
    """A new, exclusively created temporary sibling of ``out`` (a file keeps its suffix for its writer)."""
    for _ in range(8):
        tmp = out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{out.suffix if is_file else ''}"
        try:
            if is_file:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            else:
                tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise CompressError(f"cannot write beside {out} ({e.strerror})") from None
    raise CompressError(f"cannot create a temporary name beside {out}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def scratch_folder(near: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``near`` (the same file system as the output), removed on exit; if the
    process dies, the next :func:`atomic_output` of ``near`` removes it."""
    near = Path(near).expanduser().absolute()
    try:
        near.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompressError(f"cannot create the output folder {near.parent} ({e.strerror})") from None
    work = _temporary(near, "work", is_file=False)
    try:
        yield work
    finally:
        _remove(work)


def check_checkpoints(folder: str | Path, *, out: str | Path | None = None, inputs=()) -> Path:
    """Refuse a checkpoint folder compress must not use (as an output, see :func:`check_output`); it may
    exist only holding what compress writes there (checkpoint-N, final). Returns it absolute."""
    folder = check_output(folder, inputs=inputs, overwrite=True, what="checkpoint folder",
                          accept=lambda p: all(_CHECKPOINT_ENTRY.fullmatch(e) for e in os.listdir(p)))
    if out is not None and _relation(Path(os.path.realpath(folder)), out):
        raise CompressError(f"checkpoint folder {folder} overlaps the output {out}; give the checkpoints a folder of their own")
    return folder


@contextlib.contextmanager
def checkpoints_in(folder: Path) -> Iterator[Path]:
    """Train with checkpoints in ``folder``: created and marked as compress's if missing. If training
    fails, checkpoints already saved stay (for --resume); a folder left empty that compress made goes."""
    try:
        folder.mkdir(parents=True)
        (folder / OUTPUT_MARKER).write_text(json.dumps(output_marker("checkpoints")) + "\n")
    except FileExistsError:
        pass  # the user's empty folder, an earlier run's, or another process of the same launch made it
    try:
        yield folder
    except BaseException:
        if written_by_compress(folder) and os.listdir(folder) == [OUTPUT_MARKER]:
            _remove(folder)
        raise


def remove_checkpoints(folder: Path) -> None:
    """Remove what compress wrote in a checkpoint folder (checkpoint-N, final), then the folder itself if
    compress created it; anything else is left alone."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for entry in folder.iterdir():
        if entry.name != OUTPUT_MARKER and _CHECKPOINT_ENTRY.fullmatch(entry.name):
            _remove(entry)
    if written_by_compress(folder) and os.listdir(folder) == [OUTPUT_MARKER]:
        _remove(folder)


def offload_folder() -> Path:
    """Where --offload keeps activations: $COMPRESS_OFFLOAD_DIR, else the system temporary folder (checked)."""
    given = os.environ.get("COMPRESS_OFFLOAD_DIR")
    folder = Path(given).expanduser() if given else Path(tempfile.gettempdir())
    name = f"COMPRESS_OFFLOAD_DIR={given}" if given else f"the temporary folder {folder}"
    if not folder.is_dir():
        state = "a file" if os.path.lexists(folder) else "missing"
        raise CompressError(f"{name} is {state}, not a folder: point COMPRESS_OFFLOAD_DIR at a writable folder for --offload")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CompressError(f"{name} is not writable: point COMPRESS_OFFLOAD_DIR at a writable folder for --offload")
    return folder
