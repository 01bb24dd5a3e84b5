"""A semaphore's files in a lock directory, for `proclock status` and `proclock gc`.

A semaphore is found by its turnstile file, which records its name and limit; its slot files
are named from those. Garbage collection removes a semaphore's files together, and only while
nobody holds its turnstile or any of its slots: the limit record outlives every holder, so a
process asking with another limit can never record it while the old one is in use.
"""

from __future__ import annotations

import os
import stat
import time

from . import _flock
from ._semaphore import parse_limit_record, part_file_names

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ._holder import Holder

_READ = 512


class SemaphoreFiles:
    """One semaphore found in a directory: its turnstile and its slot files (existing or not)."""

    __slots__ = ("limit", "name", "slots", "turnstile")

    def __init__(self, name: str, limit: int, turnstile: str, slots: list[str]) -> None:
        self.name, self.limit, self.turnstile, self.slots = name, limit, turnstile, slots

    @property
    def paths(self) -> list[str]:
        """The turnstile and every slot file (those that exist or not)."""
        return [self.turnstile, *self.slots]


def _read_head(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.pread(fd, _READ, 0)
    finally:
        os.close(fd)


def find(paths: list[str]) -> tuple[list[SemaphoreFiles], list[str]]:
    """(the semaphores among `paths`, the other paths), every part of a semaphore in the first.

    A turnstile counts only if its record names the semaphore whose turnstile file it is (a
    record copied into another file is not believed).
    """
    found = []
    for path in paths:
        record = parse_limit_record(_read_head(path))
        if record is None:
            continue
        name, limit = record
        turnstile, slots = part_file_names(name, limit)
        if os.path.basename(path) != turnstile:
            continue
        directory = os.path.dirname(path)
        found.append(SemaphoreFiles(name, limit, path, [os.path.join(directory, s) for s in slots]))
    taken = {p for sem in found for p in sem.paths}
    return found, [p for p in paths if p not in taken]


def at(turnstile: str) -> SemaphoreFiles | None:
    """The semaphore whose turnstile file is `turnstile`, if it is one."""
    sems, _ = find([turnstile])
    return sems[0] if sems else None


def status_rows(
    sem: SemaphoreFiles,
    describe: Callable[[str, str | None], tuple[dict[str, Any], Holder | None]],
) -> list[tuple[dict[str, Any], Holder | None]]:
    """A summary row for the semaphore, then one per slot, each with its holder.

    `describe` makes a lock file's row (`status --json`) and gives its holder.
    """
    turnstile, _ = describe(sem.turnstile, sem.name)
    slots = []
    for i, path in enumerate(sem.slots):
        row, holder = describe(path, f"{sem.name} [slot {i}]")
        row.update(semaphore=sem.name, slot=i)
        slots.append((row, holder))
    held = sum(row["state"] != "free" for row, _ in slots)
    # The turnstile's holder is the head of the queue (waiting for a slot) or a process taking
    # a free one this instant; its waiters queue behind it.
    waiting = turnstile["waiters"] + (turnstile["state"] != "free")
    summary = {
        **dict.fromkeys(turnstile),  # nobody holds a semaphore as a whole
        "name": sem.name,
        "file": turnstile["file"],
        "path": turnstile["path"],
        "exists": turnstile["exists"],
        "kind": "semaphore",
        "limit": sem.limit,
        "held": held,
        "state": f"{held}/{sem.limit} held",
        "waiters": waiting,
    }
    return [(summary, None), *slots]


def collect(sem: SemaphoreFiles, *, older_than: float | None, dry_run: bool) -> list[str]:
    """Delete the semaphore's files if nobody holds its turnstile or any slot; those removed.

    Every existing file is locked (LOCK_EX|LOCK_NB) before any is unlinked, and unlinked while
    locked, as `_gc.collect` does for a lock: a process that opened one earlier finds, once it
    gets the lock, that the file is no longer at its path, and opens the new one.
    """
    fds: list[tuple[str, int, os.stat_result]] = []
    try:
        for path in sem.paths:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                continue  # a slot never used
            except OSError:
                return []
            st = os.fstat(fd)
            fds.append((path, fd, st))
            if not stat.S_ISREG(st.st_mode) or not _flock.try_lock(fd, _flock.EX, path):
                return []  # held (or not a file): never touched
        if older_than is not None and any(time.time() - st.st_mtime < older_than for *_, st in fds):
            return []
        for path, _, st in fds:
            if _flock.still_at_path(st.st_dev, st.st_ino, path) is None:
                return []  # replaced since we opened it
        removed = []
        for path, _, _ in reversed(fds):  # the slots first, the turnstile (the record) last
            if not dry_run:
                os.unlink(path)
            removed.append(path)
        return removed[::-1]
    finally:
        for _, fd, _ in fds:
            os.close(fd)  # releases our locks, after the unlinks
