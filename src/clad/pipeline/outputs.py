"""Where runs write: one writer per output (an exclusive lock), files and folders that appear whole or not at all.

Every command that writes (predict, fit, eval, report, bench, demo) takes ``output_lock`` on its output first: a
second clad run on the same output is refused with a message naming the process that holds it. Files are
written under a temporary name beside their target and renamed over it (``atomic_write``, ``FileSink``); folders
are built in a hidden staging folder and moved into place by name (``Staging.publish``), so a run that stops on
an error leaves the previous results as they were. Under ``stop_on_signals`` (the command line), SIGINT and
SIGTERM stop a run by raising ``Interrupted``, never inside an ``uninterrupted`` block.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from clad.errors import Interrupted, OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; outputs are still written atomically
    fcntl = None

LOCK_SUFFIX = ".clad-lock"


def check_kind(path: str | Path, kind: str, what: str = "--out") -> Path:
    """``path`` as an absolute Path, refused when it exists as the other kind (``kind``: "folder" or "file")."""
    path = Path(os.path.abspath(path))
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: is a file; a folder is needed")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{what} {path}: is a folder; a file name is needed")
    return path


def _make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {folder}: a file is in the way of this folder") from None
    except OSError as e:
        raise OutputError(f"{what} {folder}: cannot create the folder ({e.strerror or e})") from None


@contextmanager
def output_lock(path: str | Path, kind: str = "folder", what: str = "--out") -> Iterator[Path]:
    """Hold the output ``path`` (a "folder" or a "file") for this process; yields it as an absolute Path.

    The lock is a ``flock`` on ``.<name>.clad-lock`` beside the output, removed when the block ends (the kernel
    releases it if the process dies). Another clad run holding it is an OutputError naming its pid and command.
    """
    path = check_kind(path, kind, what)
    _make_folder(path.parent, what)
    if fcntl is None:
        yield path
        return
    lock = path.parent / f".{path.name}{LOCK_SUFFIX}"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{what} {path}: cannot create its lock file {lock} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{what} {path}: another clad run is writing there ({holder}); wait for it to end "
                              f"or choose another {what}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed it between our open and our lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {' '.join(['clad', *sys.argv[1:]])}".encode())
    try:
        yield path
    finally:
        try:
            os.unlink(lock)  # while still held, so a waiter that opened it sees it is stale
        except OSError:
            pass
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` for this process's unfinished copy of it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_file(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` over ``path`` (one rename: readers see the old file or the new one)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        tmp.write_text(text)
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Staging:
    """A hidden folder ``dest/.<tag>.staging-<pid>`` in which a run builds outputs before they replace the
    previous ones in the folder ``dest``.

    ``publish(names)`` moves each name from the staging folder into ``dest``, replacing what had that name (a
    folder is swapped whole; a name the run did not make is removed, so no stale output stays beside the new
    ones); ``merge(name)`` moves the files of a staged folder into ``dest``'s, keeping the others; ``discard``
    removes the staging folder.
    """

    def __init__(self, dest: str | Path, tag: str):
        self.dest = Path(dest)
        self.folder = self.dest / f".{tag}.staging-{os.getpid()}"

    def open(self) -> Path:
        self.dest.mkdir(parents=True, exist_ok=True)
        _remove(self.folder)
        self.folder.mkdir()
        return self.folder

    def publish(self, names: Iterable[str]) -> None:
        for name in names:
            new, old = self.folder / name, self.dest / name
            if new.is_dir():
                aside = self.dest / f".{name}.old-{os.getpid()}"
                _remove(aside)
                if old.exists() or old.is_symlink():
                    os.replace(old, aside)
                os.replace(new, old)
                _remove(aside)
            elif new.exists():
                os.replace(new, old)
            elif old.exists() or old.is_symlink():
                _remove(old)
        self.discard()

    def merge(self, name: str) -> None:
        new, old = self.folder / name, self.dest / name
        for src in sorted(p for p in new.rglob("*") if p.is_file()):
            target = old / src.relative_to(new)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def folder_digest(folder: str | Path) -> str:
    """sha256 of the regular files directly in ``folder`` (names and bytes, in name order): a saved model's identity."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# -- stopping on a signal without leaving half an output ---------------------------------------------------------
_depth = 0  # open ``uninterrupted`` blocks
_pending: int | None = None  # a signal that came during one


def _on_signal(signum, frame) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGINT (Ctrl-C) and SIGTERM raise ``Interrupted`` (a KeyboardInterrupt) in the main
    thread, except inside ``uninterrupted`` blocks, where the signal waits for the block to end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def uninterrupted(raise_after: bool = True) -> Iterator[None]:
    """A block that a signal (under ``stop_on_signals``) does not cut in two, e.g. the renames that put a run's
    outputs in place; the signal is raised when the block ends (not when it ends on an error of its own, nor
    without ``raise_after``: a last step, after which there is nothing left to stop)."""
    global _depth, _pending
    _depth += 1
    pending = None
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            pending, _pending = _pending, None
    if pending is not None and raise_after:
        raise Interrupted(signal.Signals(pending).name)
