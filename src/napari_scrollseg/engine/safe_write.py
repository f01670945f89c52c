"""Write outputs so that a kill at any moment leaves the old state or the new one.

One home for: building a folder beside its target and swapping it in
(:func:`partial_dir`, :func:`swap_in`), tidying what a killed run left
(:func:`tidy`), refusing to replace what scrollseg did not write
(:func:`check_replaceable`), and the run lock of an output (:func:`run_lock`).

Hidden helpers beside ``target`` are named ``.<name>.partial-<host>-<pid>-<id>``
(being built) and ``.<name>.old-<host>-<pid>-<id>`` (the replaced folder, between
the two renames of :func:`swap_in`); a helper whose process is gone is stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from napari_scrollseg.engine.errors import ScrollsegError

_HELPER = re.compile(r"\.(partial|old)-(.+)-(\d+)-[0-9a-f]{8}$")
STALE_EMPTY_LOCK_S = 30.0  # an empty lock older than this was left by a kill mid-write


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _me() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _helper(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_me()}-{uuid.uuid4().hex[:8]}"


def _owner_gone(helper: Path) -> bool:
    """True when the process that made a hidden helper folder no longer runs here."""
    m = _HELPER.search(helper.name)
    if m is None:
        return True  # an older name without host/pid: no run can still own it
    host, pid = m.group(2), int(m.group(3))
    return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)


def partial_dir(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to build the new state in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tidy(target)
    tmp = _helper(target, "partial")
    tmp.mkdir()
    return tmp


def tidy(target: Path) -> None:
    """Undo what a killed run left beside ``target``: restore an old state, drop partials."""
    parent = target.parent
    if not parent.is_dir():
        return
    olds = sorted(p for p in parent.glob(f".{target.name}.old-*") if _owner_gone(p))
    if olds and not target.exists():  # killed between the two renames: the old state back
        os.rename(olds.pop(), target)
    for p in [*olds, *(p for p in parent.glob(f".{target.name}.partial-*") if _owner_gone(p))]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def swap_in(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing what is there."""
    old = None
    if target.exists():
        old = _helper(target, "old")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def scrollseg_attrs(path: Path) -> dict | None:
    """The ``scrollseg`` entry of a zarr group's attributes (v2 or v3), else None."""
    for name, key in ((".zattrs", None), ("zarr.json", "attributes")):
        try:
            attrs = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if key is not None and isinstance(attrs, dict):
            attrs = attrs.get(key)
        info = attrs.get("scrollseg") if isinstance(attrs, dict) else None
        if isinstance(info, dict):
            return info
    return None


def check_replaceable(
    path: Path, what: str, ours: Callable[[dict], bool] = lambda info: True
) -> None:
    """Refuse to replace ``path`` unless it is empty or a scrollseg output of this kind."""
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    info = scrollseg_attrs(path) if path.is_dir() else None
    if info is None or not ours(info):
        raise ScrollsegError(
            f"{path} is not a {what} written by scrollseg; it was left as it is (overwrite "
            "replaces only scrollseg's own outputs): choose another output path"
        )


# -- the run lock of an output ---------------------------------------------------------------
def lock_holder(lock: Path) -> str | None:
    """Who holds ``lock`` while alive (``"pid N"`` / ``"host H"``), None when free or stale."""
    try:
        text = lock.read_text().strip()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    host, _, pid = text.partition(" ")
    if not text or not pid.isdigit():  # left empty by a kill between create and write
        return None if age > STALE_EMPTY_LOCK_S else "a run that is starting"
    if host != socket.gethostname():
        return f"host {host}"
    if int(pid) == os.getpid() or not pid_alive(int(pid)):
        return None
    return f"pid {pid}"


@contextlib.contextmanager
def run_lock(state: Path) -> Iterator[None]:
    """Refuse a second run on the same output while one is alive (stale locks are taken).

    The lock is made whole (written to a temporary name, then linked into place), so
    it is never seen empty; an empty one left by an older version is stale after
    :data:`STALE_EMPTY_LOCK_S`.
    """
    lock = state / "lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    tmp = state / f".lock-{uuid.uuid4().hex[:8]}"
    tmp.write_text(me)
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                holder = lock_holder(lock)
                if holder is not None:
                    hint = (
                        f"if no run is active there any more, delete {lock}"
                        if holder.startswith("host")
                        else "wait for it to finish or stop it"
                    )
                    raise ScrollsegError(
                        f"{state.parent} is being written by another scrollseg run "
                        f"({holder}); {hint}"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: the run that held it is gone
        else:
            raise ScrollsegError(f"could not take the lock {lock}; try again")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == me:
                lock.unlink()


def check_not_locked(state: Path) -> None:
    """Refuse while a live run holds ``state/lock`` (e.g. before deleting its output)."""
    holder = lock_holder(state / "lock")
    if holder is not None:
        raise ScrollsegError(
            f"{state.parent} is being written by another scrollseg run ({holder}); "
            "--overwrite would delete its output: wait for it to finish or stop it"
        )
