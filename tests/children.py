"""Targets for child processes (importable under the spawn start method)."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time

import proclock


def hold(name, lock_dir, locked, release, shared=False):
    """Hold `name` until `release` is set; `locked` is set once it is held."""
    with proclock.ProcessLock(name, lock_dir=lock_dir, shared=shared):
        locked.set()
        if not release.wait(30):
            raise SystemExit(3)


def hold_path(path, locked, release):
    with proclock.ProcessLock(path=path):
        locked.set()
        if not release.wait(30):
            raise SystemExit(3)


def hold_forever(name, lock_dir, locked):
    """Hold until killed."""
    with proclock.ProcessLock(name, lock_dir=lock_dir):
        locked.set()
        while True:
            time.sleep(60)


def pid_file_write(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))


# --- for test_processes.py ---------------------------------------------------------------------


def fd_targets(pid="self"):
    """Where each open descriptor of a process points (os.readlink of /proc/PID/fd/*)."""
    base = f"/proc/{pid}/fd"
    targets = []
    for fd in os.listdir(base):
        try:
            targets.append(os.readlink(f"{base}/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used, closed since
            continue
    return targets


def kernel_flocks(path):
    """The flock(2) locks on the file at `path`, from /proc/locks: [(pid, kind, waiting)]."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            waiting = len(fields) > 1 and fields[1] == "->"
            if waiting:
                del fields[1]
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key:
                found.append((int(fields[4]), fields[3], waiting))
    return found


def blocked_in_kernel(path, pid=None):
    """True while a process (this one by default) is blocked in flock(2) on `path`."""
    pid = os.getpid() if pid is None else pid
    return any(p == pid and waiting for p, _, waiting in kernel_flocks(path))


def wait_until(predicate, timeout=30.0):
    """Poll a probe of the test (never the lock under test) until it holds; False on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@proclock.process_locked
def locked_increment(path):
    """Read, add one, write back: loses updates unless every caller is excluded."""
    with open(path) as f:
        value = int(f.read())
    with open(path, "w") as f:
        f.write(str(value + 1))


def count_worker(path, threads, iterations, start):
    """`threads` threads calling locked_increment(path) `iterations` times each."""
    errors = []

    def run():
        try:
            for _ in range(iterations):
                locked_increment(path)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    start.wait(30)  # a Barrier: raises BrokenBarrierError on timeout
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def try_once(name, lock_dir, shared=False):
    """Exit 0 if `name` can be taken at once (it is released again), 1 if it is busy."""
    lock = proclock.ProcessLock(name, lock_dir=lock_dir, blocking=False, shared=shared)
    try:
        lock.acquire()
    except proclock.LockHeldError:
        raise SystemExit(1) from None
    lock.release()


def close_inherited_pipes():
    """In a forked grandchild: close the pipes inherited from its multiprocessing parent.

    A spawn child keeps the write end of its sentinel pipe open for life; a grandchild that
    inherited it would make the test's Process.join() wait for the grandchild too.
    """
    for fd in os.listdir("/proc/self/fd"):
        try:
            if int(fd) > 2 and stat.S_ISFIFO(os.fstat(int(fd)).st_mode):
                os.close(int(fd))
        except OSError:  # the descriptor listdir used
            continue


def fork_while_holding(name, lock_dir, holding, child_pid, done):
    """Hold `name`, fork a child that lives on until `done`, then wait to be killed."""
    proclock.ProcessLock(name, lock_dir=lock_dir).acquire()
    pid = os.fork()
    if pid == 0:
        try:
            close_inherited_pipes()
            # By now the fork handlers have run in this child.
            child_pid.value = os.getpid()
            holding.set()
            done.wait(30)
        finally:
            os._exit(0)
    # Not done.wait(): an Event's set() hangs on a waiter that was SIGKILLed.
    time.sleep(30)
    raise SystemExit(3)  # the test kills this process first


def transfer_and_exit(name, lock_dir, state, child_ready, child_exit):
    """Hold `name`, hand it to a forked child with transfer_on_fork(), exit without releasing.

    `state` (Array "i", 5): the child's `locked`, the parent's `locked` after the fork, whether
    the parent and the child still have a descriptor of the lock file, the child's pid.
    """
    lock = proclock.ProcessLock(name, lock_dir=lock_dir)
    lock.acquire()
    path = os.path.realpath(lock.path)
    lock.transfer_on_fork()
    pid = os.fork()
    if pid == 0:
        try:
            close_inherited_pipes()
            state[0] = int(lock.locked)
            state[3] = int(path in fd_targets())
            state[4] = os.getpid()
            child_ready.set()
            child_exit.wait(30)
        finally:
            os._exit(0)  # exits holding the lock: the kernel frees it with the last descriptor
    state[1] = int(lock.locked)
    state[2] = int(path in fd_targets())
    if not child_ready.wait(30):
        raise SystemExit(3)


def alarm_waiter(name, lock_dir, timeout, waiting, acquired):
    """Wait for `name` while a no-op SIGALRM handler runs every millisecond."""
    delivered = [0]

    def tick(signum, frame):
        delivered[0] += 1

    signal.signal(signal.SIGALRM, tick)
    lock = proclock.ProcessLock(name, lock_dir=lock_dir)
    path = lock.path

    def announce():
        # Blocked in the kernel, and at least 100 signals arrived during the wait.
        if wait_until(lambda: blocked_in_kernel(path)):
            seen = delivered[0]
            if wait_until(lambda: delivered[0] >= seen + 100):
                waiting.set()

    threading.Thread(target=announce, daemon=True).start()
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        lock.acquire(timeout=timeout)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        acquired.set()
    finally:
        lock.release()


def hold_until_go(name, lock_dir, locked, go, released_ns):
    """Hold `name`; once `go` is set, note time.perf_counter_ns() and release."""
    lock = proclock.ProcessLock(name, lock_dir=lock_dir)
    lock.acquire()
    locked.set()
    if not go.wait(30):
        raise SystemExit(3)
    released_ns.value = time.perf_counter_ns()
    lock.release()


def sigint_waiter():
    """Script: Ctrl-C while waiting leaves no lock, descriptor or thread behind.

    Run as `python -c "import children; children.sigint_waiter()" NAME TIMEOUT` (seconds, or
    "none" to wait forever) while another process holds NAME. Prints "waiting" once blocked;
    after the KeyboardInterrupt checks and prints "interrupted"; on the line "released" waits
    for its helper (if any) to let go and prints "free"; on the line "checked" makes the final
    checks and prints "OK".
    """
    from proclock import _core
    from proclock.backends import flock as flock_backend

    name = sys.argv[1]
    timeout = None if sys.argv[2] == "none" else float(sys.argv[2])
    try:
        proclock.ProcessLock(name, blocking=False).acquire()
    except proclock.LockHeldError:
        pass
    else:
        raise SystemExit("the lock was expected to be busy")
    lock = proclock.ProcessLock(name)
    path = lock.path
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()

    def announce():
        if wait_until(lambda: blocked_in_kernel(path)):
            print("waiting", flush=True)

    announcer = threading.Thread(target=announce, daemon=True)
    announcer.start()
    try:
        lock.acquire(timeout=timeout)
    except KeyboardInterrupt:
        pass
    else:
        raise SystemExit("acquired instead of interrupted")
    announcer.join()

    def busy():
        return {p: s for p, s in _core.snapshot().items() if s["owners"] or s["waiters"]}

    # A timed wait leaves its parked wait in flock(2), on a description of its own (one more
    # descriptor); it is given back to the pool once the lock is released.
    extra = 0 if timeout is None else 1
    if busy() or lock.locked or len(os.listdir("/proc/self/fd")) > fds + extra:
        raise SystemExit(f"left behind: {busy()}, fds {os.listdir('/proc/self/fd')} vs {fds}")
    print("interrupted", flush=True)
    if sys.stdin.readline().strip() != "released":
        raise SystemExit("expected 'released'")
    # The parked wait in flock(2) for nobody gets the lock now, and must let go at once.
    if not wait_until(lambda: flock_backend.parked_waits() == 0, timeout=10):
        raise SystemExit("the helper kept waiting after the holder released")
    print("free", flush=True)
    if sys.stdin.readline().strip() != "checked":
        raise SystemExit("expected 'checked'")
    if busy() or len(os.listdir("/proc/self/fd")) > fds + extra:
        raise SystemExit(f"left behind: {busy()}, fds {os.listdir('/proc/self/fd')} vs {fds}")
    if threading.active_count() > threads + 1:  # an idle helper may stay, for reuse
        raise SystemExit(f"threads: {threading.enumerate()}")
    print("OK", flush=True)


# --- for test_files.py, test_errors.py and test_holder.py --------------------------------------


def hold_then_remove(name, lock_dir, locked, go, how, *, replacement=None):
    """Hold `name`; once `go` is set, unlink (or os.replace `replacement` over) its file, release.

    What a tmp cleaner, or a careless `rm`, does to a lock file while somebody waits for it.
    """
    with proclock.ProcessLock(name, lock_dir=lock_dir) as lock:
        locked.set()
        if not go.wait(30):
            raise SystemExit(3)
        if how == "unlink":
            os.unlink(lock.path)
        else:
            os.replace(replacement, lock.path)


def make_error(kind, *args):
    """Build the proclock error class `kind` from `args`, in this process."""
    return getattr(proclock, kind)(*args)


def raise_error(kind, *args):
    """Raise a proclock error built in this process (for ProcessPoolExecutor tests)."""
    raise make_error(kind, *args)


def take_busy(name, lock_dir, timeout=None):
    """Try to take a lock another process holds: raises LockHeldError / LockTimeoutError."""
    if timeout is None:
        proclock.ProcessLock(name, lock_dir=lock_dir, blocking=False).acquire()
    else:
        proclock.ProcessLock(name, lock_dir=lock_dir, timeout=timeout).acquire()
    raise SystemExit("the lock was expected to be busy")
