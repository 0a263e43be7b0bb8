"""One run per run folder: `train`, `demo` and `eval --out` hold a lock in their output folder.

Mechanism: an exclusive, non-blocking `fcntl.flock` on `<folder>/memagent-jax.lock`, held through
an open file descriptor for as long as the run lasts, plus a JSON record in that file of the holder
(host, pid, start time, command). The kernel drops a flock when its process dies however it dies
(SIGKILL, OOM, a crash), so the lock itself never goes stale; only the record can outlive a run:

- the flock is held by another process: `RunFolderBusy` (an `InputError`, exit status 2 in the
  CLI) naming the folder, the holder and what to do; nothing in the folder is touched;
- the flock is free and the record names a process of this host: that run died without releasing
  it; the lock is taken over with a warning naming the dead holder;
- the flock is free and the record names another host: whether that run is still going cannot be
  told from here (flock may not reach across hosts on every network file system), so it is refused
  too, and the message says to delete the lock file if that run is over.

A run that ends (normally or by an exception) deletes the file (and the folder, if the lock made
it and the run left it empty: bad input leaves nothing behind). The holder re-checks after locking
that the path still names the file it locked, so a run that releases (unlinks) the file while
another one is opening it cannot let two runs in.

In a multi-process (multi-host) job only the coordinator, process 0, takes the lock; the outcome
is shared with every process (`run_folder_lock(..., collective=True)`), so that all of them stop
together when the folder is busy.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memagent_jax.errors import InputError

LOCK_FILE = "memagent-jax.lock"


class RunFolderBusy(InputError):
    """Another run holds (or may hold) the run folder's lock."""


def _record(command: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command}


def _read_record(fd: int) -> dict[str, Any]:
    """The holder record in the open lock file ({} if empty or unreadable: a torn write)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder(rec: dict[str, Any]) -> str:
    """'host H, pid P, started T (`command`)' for messages."""
    text = f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, started {rec.get('started', '?')}"
    return text + (f" (`{rec['command']}`)" if rec.get("command") else "")


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """The held lock of one run folder (see the module docstring); `release()` gives it back."""

    def __init__(self, folder: str | os.PathLike[str], command: str = "memagent-jax") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        # The folders this lock creates, deepest first: removed again on release if still empty,
        # so that a run refused for bad input leaves nothing behind.
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self._acquire(command)

    def _acquire(self, command: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                rec = _read_record(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusy(
                    f"the run folder {self.folder} is in use by another run ({_holder(rec)})", self.path,
                    "wait for that run to finish or stop it, or give this run another output folder "
                    "(train: trainer.out_dir=DIR; demo, eval: --out DIR)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder deleted the file after we opened it: open it anew
        try:
            self._check_previous(_read_record(fd))
            data = json.dumps(_record(command)).encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data + b"\n", 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _check_previous(self, rec: dict[str, Any]) -> None:
        """A record left in a lock nobody holds: take it over (this host) or refuse (another)."""
        if not rec:
            return
        host, pid = rec.get("host"), rec.get("pid")
        if host == socket.gethostname():
            state = "no longer running" if not isinstance(pid, int) or not _alive(pid) else \
                "not holding it (its pid was reused)"
            warnings.warn(f"{self.path}: took over the lock left by a run that is {state} "
                          f"({_holder(rec)})", stacklevel=4)
            return
        raise RunFolderBusy(
            f"the run folder {self.folder} was locked by a run on another host ({_holder(rec)}), "
            "which may still be running", self.path,
            f"if that run is over, delete {self.path} and start again; else give this run another "
            "output folder")

    def release(self) -> None:
        """Deletes the lock file and drops the lock (idempotent); folders the lock created are
        removed if the run left them empty."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote there), or gone
                break

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike[str], command: str | None = None, *,
                    collective: bool = False) -> Iterator[RunLock | None]:
    """Holds the run folder's lock for the `with` block (None on processes other than 0).

    `command`: recorded for the message a second run prints (default: this process's command
    line). `collective=True` (a multi-process job, after `jax.distributed.initialize`): process 0
    takes the lock and every process learns whether it got it; the others raise `RunFolderBusy`
    too when it did not, instead of waiting in the job's first collective.
    """
    import jax

    command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    lock: RunLock | None = None
    error: RunFolderBusy | None = None
    if jax.process_index() == 0:
        try:
            lock = RunLock(folder, command)
        except RunFolderBusy as e:
            error = e
    if collective and jax.process_count() > 1:
        from memagent_jax.distributed import allgather_ints

        refused = int(allgather_ints([int(error is not None)])[0, 0])
        if refused and error is None:
            error = RunFolderBusy(f"the run folder {folder} is in use by another run (process 0 "
                                  "could not lock it; its log names the holder)", Path(folder) / LOCK_FILE,
                                  "wait for that run to finish or give this run another output folder")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
