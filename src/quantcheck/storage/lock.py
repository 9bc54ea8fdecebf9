"""One writer per run folder.

A run holds an exclusive `flock` on the folder's lock file for as long as it writes. The kernel drops the lock
when the process ends, however it ends (SIGKILL, power loss included), so a dead run never blocks the next one;
the file also names its holder (pid, start time, command), which a refused run prints. A clean exit empties the
file, so a holder's details still there when the lock is free mean that run died: the next one takes over and
says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from quantcheck.errors import ResultsFolderError
from quantcheck.storage.folder import make_folder


def _read(fd: int) -> dict[str, object] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", "replace").strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def describe_holder(holder: dict[str, object] | None) -> str:
    if not holder:
        return "a quantcheck run (its details not written yet)"
    return f"quantcheck pid {holder.get('pid')} (started {holder.get('started')}: {holder.get('command')})"


class RunLock:
    """Held while a run writes its folder; `took_over` names a dead holder whose lock this one took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.took_over: str | None = None

    def __enter__(self) -> RunLock:
        make_folder(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ResultsFolderError(f"cannot write {self.path}: {error.strerror}; choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ResultsFolderError(
                f"{self.path.parent} is being written by {describe_holder(holder)}: wait for it to finish, "
                "or choose another --out"
            ) from None
        if previous := _read(fd):
            self.took_over = f"{describe_holder(previous)} stopped without finishing; this run takes over its folder"
        me = {
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(arg) if i == 0 else arg for i, arg in enumerate(sys.argv)),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean exit: nobody to take over from
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def current_holder(path: Path) -> str | None:
    """Who is writing the folder now, or None when no run holds its lock (for readers such as the report)."""
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return describe_holder(_read(fd))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
