"""Child-process targets and scripts for test_regressions.py.

Spawned targets are plain functions; the scenarios that may deadlock or that need a process of
their own run as scripts: `python regression_children.py SCENARIO SECONDS`, printing one JSON
line. `faulthandler` dumps every thread's stack before the test's timeout kills a hung script,
so that a deadlock names the line it is stuck on.
"""

from __future__ import annotations

import faulthandler
import fcntl
import gc
import json
import os
import random
import resource
import signal
import sys
import threading
import time
import traceback

import proclock

# A script whose multiprocessing children (spawn, forkserver) call a bare @process_locked
# function: the children import it as `__mp_main__`, the parent runs it as `__main__`.
MP_MAIN_SCRIPT = """\
import multiprocessing, os, sys
from proclock import process_locked


@process_locked
def increment(path):
    with open(path) as f:
        value = int(f.read())
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(value + 1))
    os.replace(tmp, path)  # readers never see a half-written file, only lost updates


def work(path, n):
    for _ in range(n):
        increment(path)


def start(barrier):
    barrier.wait(60)  # every worker starts with the parent: the three overlap


if __name__ == "__main__":
    method, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ctx = multiprocessing.get_context(method)
    barrier = ctx.Barrier(3)
    with ctx.Pool(2, initializer=start, initargs=(barrier,)) as pool:
        results = [pool.apply_async(work, (path, n)) for _ in range(2)]
        barrier.wait(60)
        work(path, n)
        for result in results:
            result.get(60)
    with open(path) as f:
        print(f.read())
"""


@proclock.process_locked
def locked_square(x):
    """A bare-decorated module-level function: pickled by reference."""
    return x * x


def _flock_key(path):
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def _held_by(pid, key):
    """True if /proc/locks shows process `pid` holding (not waiting for) a flock on `key`."""
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "->":
                continue
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[4:6] == [str(pid), key]:
                return True
    return False


def transfer_with_failing_fork(name, lock_dir, report):
    """Hold `name`, mark it for transfer_on_fork(), then fork() with fork failing (EAGAIN).

    fork() is made to fail for real: the process drops to uid `nobody` (when root) and sets
    RLIMIT_NPROC to 1, so that the kernel refuses a second process. Sends what the library and
    the kernel say afterwards, then holds on until the test says "done".
    """
    lock = proclock.ProcessLock(name, lock_dir=lock_dir)
    lock.acquire()
    key = _flock_key(lock.path)  # before dropping privileges: the pytest tmp dir is 0700
    lock.transfer_on_fork()
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    try:
        pid = os.fork()
    except OSError as exc:
        failed = exc.errno
    else:
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        failed = None
    report.send({"errno": failed, "locked": lock.locked, "kernel": _held_by(os.getpid(), key)})
    if report.recv() != "done":
        raise SystemExit(3)
    if lock.locked:
        lock.release()


def nonblocking_attempts(names, nofile):
    """One blocking=False attempt on each of `names` (all busy), under RLIMIT_NOFILE `nofile`."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    busy = 0
    for i, name in enumerate(names):
        try:
            proclock.ProcessLock(name, blocking=False).acquire()
        except proclock.LockHeldError:
            busy += 1
        except OSError as exc:
            return {"busy": busy, "failed_at": i, "error": repr(exc)}
        else:
            return {"busy": busy, "failed_at": i, "error": "acquired a busy lock"}
    return {"busy": busy, "failed_at": None, "error": None}


def timed_out_attempts(names, timeout):
    """An acquire(timeout=) on each of `names` (all busy); the thread counts before and after."""
    before = peak = threading.active_count()
    timed_out = 0
    for name in names:
        try:
            proclock.ProcessLock(name).acquire(timeout=timeout)
        except proclock.LockTimeoutError:
            timed_out += 1
        peak = max(peak, threading.active_count())
    return {
        "timed_out": timed_out,
        "before": before,
        "after": threading.active_count(),
        "peak": peak,
    }


def acquire_then_release_many(count):
    """Seconds to acquire `count` distinct locks (all held at once), then to release them all."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        return {"skipped": f"RLIMIT_NOFILE hard limit {hard} < {need}"}
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    locks = [proclock.ProcessLock(f"many-{i}") for i in range(count)]
    start = time.perf_counter()
    for lock in locks:
        lock.acquire()
    acquired = time.perf_counter()
    for lock in locks:
        lock.release()
    released = time.perf_counter()
    return {"acquire": acquired - start, "release": released - acquired}


# -- scripts ------------------------------------------------------------------------------------


def gc_finalizer(seconds):
    """Abandoned decorated generators, finalized by the collector inside another thread's locking.

    A second thread keeps abandoning started generators (each holds a lock) in reference
    cycles, which only the cyclic collector frees; the main thread keeps taking locks with new
    names (the holder record is encoded for each). Collections run in whichever thread
    allocates when the threshold is crossed: often the main thread, inside the library's
    locking, and the finalizer then gives back the generator's hold right there.
    """

    @proclock.process_locked("abandoned-generator")
    def numbers():
        yield 1
        yield 2

    stop = []
    abandoned = [0]

    def abandon():
        while not stop:
            gen = numbers()
            next(gen)  # holds "abandoned-generator" until its finalizer closes it
            cycle = [gen]
            cycle.append(cycle)
            abandoned[0] += 1

    gc.set_threshold(200, 5, 5)
    sys.setswitchinterval(1e-5)  # the threads take turns often, not only at system calls
    thread = threading.Thread(target=abandon, daemon=True)
    thread.start()
    rounds = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with proclock.ProcessLock(f"fresh-{rounds}"):
                pass
            with proclock.ProcessLock("taken-meanwhile").acquire(timeout=5):
                pass
            rounds += 1
    finally:
        stop.append(True)
        thread.join(30)
    gc.set_threshold(700, 10, 10)
    gc.collect()
    return {"rounds": rounds, "abandoned": abandoned[0]}


def signal_handler(seconds):
    """A SIGALRM handler that takes locks, every 200 us, while the main thread takes others."""
    other = proclock.ProcessLock("in-handler")

    @proclock.process_locked("in-handler-decorated")
    def decorated():
        return None

    handled, busy = [0], []

    def handler(signum, frame):
        if busy:  # a signal during the handler itself: Python would nest handlers without end
            return
        busy.append(True)
        try:
            with other:
                pass
            decorated()
            handled[0] += 1
        finally:
            busy.clear()

    lock = proclock.ProcessLock("in-main")
    for warm in (lock, other):  # the files exist, and the lock directory is known
        with warm:
            pass
    signal.signal(signal.SIGALRM, handler)
    rounds = 0
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with lock:
                pass
            with lock.acquire(timeout=5):
                pass
            rounds += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"rounds": rounds, "handled": handled[0]}


def _descriptions_on(path):
    """How many descriptors of this process refer to the file at `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == path
        except OSError:
            continue
    return count


def _busy(path):
    """True if a new open file description cannot take `path` now (it lets go at once)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _force_release(lock):
    """Give back whatever the library holds on this lock's file, public API first."""
    while lock.locked:
        lock.release()
    core = sys.modules.get("proclock._core")
    if core is None:
        return
    for hold in core.holds():
        while hold.state == core.HELD:
            core.give(hold)
        core._holds.pop(hold.key, None)  # a PENDING hold left by an interrupt


class _Interrupter:
    """One KeyboardInterrupt per round, at a random moment, from one of two sources in turn.

    "sigint": a thread sends SIGINT after a random pause. It needs the GIL to do so, which it
    mostly gets while the main thread is in a system call: the interrupt lands right after one
    (after flock(2) succeeds, after LOCK_UN), the moments the issue names.
    "timer": a one-shot ITIMER_REAL whose SIGALRM runs Python's SIGINT handler
    (`signal.default_int_handler`): it lands at whatever point the main thread has reached,
    function entries and loop jumps included.
    """

    def __init__(self, seed):
        self.rng = random.Random(seed)  # noqa: S311  (timing jitter, not cryptography)
        self.armed, self.ack = threading.Event(), threading.Event()
        self.stopped = False
        self.resent = 0
        signal.signal(signal.SIGALRM, signal.default_int_handler)
        threading.Thread(target=self._sender, daemon=True).start()

    def _sender(self):
        me = os.getpid()
        while True:
            self.armed.wait()
            self.armed.clear()
            if self.stopped:
                return
            time.sleep(self.rng.uniform(0, 60e-6))
            os.kill(me, signal.SIGINT)
            while not self.ack.wait(2.0):  # swallowed by someone: send another, and say so
                self.resent += 1
                os.kill(me, signal.SIGINT)
            self.ack.clear()

    def arm(self, source):
        if source == "sigint":
            self.armed.set()
        else:  # re-sent after 2 s if the first is swallowed
            signal.setitimer(signal.ITIMER_REAL, self.rng.uniform(1e-6, 40e-6), 2.0)

    def delivered(self, source, took):
        """After the round's KeyboardInterrupt: no other signal comes until the next arm()."""
        if source == "sigint":
            self.ack.set()
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.resent += took > 1.5

    def stop(self):
        self.stopped = True
        self.armed.set()


def _spin(form, lock, decorated):
    """Take and give back the lock in a loop, until interrupted."""
    while True:
        if form == "acquire":
            lock.acquire()
            lock.release()
        elif form == "with":
            with lock:
                pass
        elif form == "decorated":
            decorated()
        else:
            lock.acquire(timeout=5)
            lock.release()


def sigint_stress(seconds):
    """Ctrl-C at random moments of acquire/release loops; after each, the kernel must agree.

    Each round the main thread takes and gives back the lock in a loop (four forms in turn)
    until one KeyboardInterrupt arrives (`_Interrupter`). Then the lock file is probed with a
    new open file description: it must be busy exactly when the library says the lock is held
    (`lock.locked`), and the library's registry must hold nothing else. A mismatch is an orphan
    (or a phantom); its traceback names where the interrupt landed.
    """
    lock = proclock.ProcessLock("ctrl-c")

    @proclock.process_locked("ctrl-c")
    def decorated():
        return None

    with lock:
        pass
    path = os.path.realpath(lock.path)
    seed = int.from_bytes(os.urandom(4), "big")
    interrupter = _Interrupter(seed)
    forms = ("acquire", "with", "decorated", "timeout")
    rounds, mismatches, errors = 0, [], []
    inside = set()  # the lines of proclock where an interrupt landed
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(mismatches) < 20 and not errors:
        source = ("sigint", "timer")[rounds % 2]
        form = forms[rounds // 2 % len(forms)]
        where = None
        began = time.monotonic()
        try:
            interrupter.arm(source)
            _spin(form, lock, decorated)
        except KeyboardInterrupt as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = [f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}" for f in frames]
            if "proclock" in frames[-1].filename:
                inside.add(where[-1])
        except Exception as exc:
            errors.append({"form": form, "error": repr(exc), "tb": traceback.format_exc()})
        interrupter.delivered(source, time.monotonic() - began)
        rounds += 1
        says, kernel = lock.locked, _busy(path)
        core = sys.modules.get("proclock._core")  # the new registry: held or being acquired
        registered = (
            [repr(h) for h in core.holds() if h.state in (core.HELD, core.PENDING)] if core else []
        )
        if says != kernel or (registered and not says):
            mismatches.append(
                {
                    "source": source,
                    "form": form,
                    "locked": says,
                    "kernel": kernel,
                    "registered": registered,
                    "at": where,
                }
            )
        try:
            _force_release(lock)
        except Exception as exc:
            errors.append({"form": form, "error": repr(exc), "tb": traceback.format_exc()})
        if _busy(path):
            errors.append({"form": form, "error": "held in the kernel with nothing to release"})
    interrupter.stop()
    return {
        "rounds": rounds,
        "mismatches": mismatches,
        "errors": errors,
        "resent": interrupter.resent,
        "descriptions": _descriptions_on(path),
        "inside": sorted(inside),
        "seed": seed,
    }


SCENARIOS = {
    "gc-finalizer": gc_finalizer,
    "signal-handler": signal_handler,
    "sigint-stress": sigint_stress,
}

if __name__ == "__main__":
    scenario, seconds, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    faulthandler.dump_traceback_later(timeout, exit=True)  # a deadlock shows where it is stuck
    print(json.dumps(SCENARIOS[scenario](seconds)), flush=True)
