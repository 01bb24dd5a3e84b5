"""Options: validated when the decorator is applied, Retry's schedule, timeout and blocking."""

from __future__ import annotations

import fcntl
import math
import random
import threading

import pytest

import proclock
from helpers import held_by_another_description
from proclock import (
    AlreadyRunningError,
    LockHeldError,
    LockTimeoutError,
    ProcessLock,
    Retry,
    _core,
    lock_path,
    process_locked,
    singleton_process,
)


def body():
    return "ran"


def seeded(seed):
    """A seeded generator: the jitter is reproducible, not secret."""
    return random.Random(seed)  # noqa: S311


# -- validation when the decorator is applied ---------------------------------------------------

CONTRADICTIONS = [
    pytest.param({"blocking": False, "timeout": 1}, id="nonblocking-with-timeout"),
    pytest.param({"blocking": False, "timeout": 0}, id="nonblocking-with-zero-timeout"),
    pytest.param({"timeout": -1}, id="negative-timeout"),
    pytest.param({"timeout": -0.001}, id="slightly-negative-timeout"),
    pytest.param({"timeout": math.nan}, id="nan-timeout"),
    pytest.param({"retry": 3}, id="retry-with-unbounded-wait"),
    pytest.param({"retry": Retry(attempts=2)}, id="Retry-with-unbounded-wait"),
    pytest.param({"retry": 3, "blocking": True, "timeout": None}, id="retry-explicit-unbounded"),
    pytest.param({"mode": 0o10000}, id="mode-too-large"),
    pytest.param({"mode": -1}, id="mode-negative"),
    pytest.param({"mode": "0600"}, id="mode-str"),
]
DECORATOR_ONLY = [
    pytest.param({"on_contention": "ignore"}, id="unknown-on_contention"),
    pytest.param({"on_contention": "RAISE"}, id="on_contention-is-case-sensitive"),
    pytest.param({"exit_code": 256}, id="exit_code-too-large"),
    pytest.param({"exit_code": -1}, id="exit_code-negative"),
    pytest.param({"exit_code": "1"}, id="exit_code-str"),
]


@pytest.mark.parametrize("options", CONTRADICTIONS + DECORATOR_ONLY)
def test_process_locked_refuses_contradictions_when_applied(options):
    with pytest.raises(ValueError):
        process_locked(**options)
    with pytest.raises(ValueError):
        process_locked("named", **options)


# singleton_process does not block by default, so a bare retry= is fine there (tested below).
SINGLETON_CONTRADICTIONS = [p for p in CONTRADICTIONS if "unbounded-wait" not in p.id]


@pytest.mark.parametrize("options", SINGLETON_CONTRADICTIONS + DECORATOR_ONLY)
def test_singleton_process_refuses_contradictions_when_applied(options):
    with pytest.raises(ValueError):
        singleton_process(**options)


@pytest.mark.parametrize("options", CONTRADICTIONS)
def test_process_lock_refuses_contradictions_in_constructor(options):
    with pytest.raises(ValueError):
        ProcessLock("x", **options)


@pytest.mark.parametrize("option", ["on_contention", "exit_code"])
def test_process_lock_takes_no_decorator_only_options(option):
    with pytest.raises(TypeError):
        ProcessLock("x", **{option: 1})


def test_validation_never_waits_for_a_call(lock_dir):
    calls = []

    def f():
        calls.append(1)

    with pytest.raises(ValueError, match="blocking=False"):
        process_locked(blocking=False, timeout=5)(f)
    assert calls == []
    assert list(lock_dir.iterdir()) == []  # nothing was created either


def test_singleton_process_retries_without_blocking_by_default(lock_dir, sleeps):
    wrapped = singleton_process("single-retry", retry=3, on_contention="raise")(body)
    with held_by_another_description("single-retry"), pytest.raises(AlreadyRunningError):
        wrapped()
    assert len(sleeps) == 2


def test_timeout_implies_blocking_for_singleton_process(lock_dir):
    # Not contradictory: singleton_process defaults to blocking=False, but a timeout says wait.
    wrapped = singleton_process(timeout=5)(body)
    assert wrapped() == "ran"
    with pytest.raises(ValueError):
        singleton_process(blocking=False, timeout=5)


def test_timeout_for_singleton_process_waits(lock_dir):
    name = "single-waits"
    wrapped = singleton_process(name, timeout=5, on_contention="raise")(body)
    release = threading.Event()
    holder = ProcessLock(name)

    def hold_then_release():
        with holder:
            started.set()
            release.wait(30)

    started = threading.Event()
    thread = threading.Thread(target=hold_then_release)
    thread.start()
    assert started.wait(10)
    result = []
    waiter = threading.Thread(target=lambda: result.append(wrapped()))
    waiter.start()
    waiter.join(0.1)
    assert waiter.is_alive()  # it waits rather than exiting at once
    release.set()
    waiter.join(30)
    thread.join(30)
    assert result == ["ran"]


@pytest.mark.parametrize("timeout", [0, 0.5, 5, None])
def test_valid_options_are_accepted(lock_dir, timeout):
    assert process_locked(timeout=timeout)(body)() == "ran"
    assert process_locked(blocking=False)(body)() == "ran"
    assert process_locked(blocking=False, retry=2)(body)() == "ran"
    assert process_locked(timeout=1, retry=Retry(3))(body)() == "ran"
    assert process_locked(mode=0o644, exit_code=0, on_contention=repr)(body)() == "ran"


# -- Retry ------------------------------------------------------------------------------------


def test_retry_defaults():
    retry = Retry(3)
    assert (retry.attempts, retry.delay, retry.backoff, retry.max_delay, retry.jitter) == (
        3,
        0.1,
        2.0,
        10.0,
        0.1,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"attempts": 0}, id="zero-attempts"),
        pytest.param({"attempts": -1}, id="negative-attempts"),
        pytest.param({"attempts": 2, "delay": -1}, id="negative-delay"),
        pytest.param({"attempts": 2, "backoff": 0.5}, id="shrinking-backoff"),
        pytest.param({"attempts": 2, "max_delay": -1}, id="negative-max_delay"),
        pytest.param({"attempts": 2, "jitter": 1.5}, id="jitter-above-one"),
        pytest.param({"attempts": 2, "jitter": -0.1}, id="negative-jitter"),
        pytest.param({"attempts": 2, "delay": math.nan}, id="nan-delay"),
    ],
)
def test_retry_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        Retry(**kwargs)


def test_retry_pauses_without_jitter_follow_the_schedule():
    retry = Retry(attempts=6, delay=0.1, backoff=2.0, max_delay=0.5, jitter=0)
    # attempts counts all attempts: 6 attempts, 5 pauses; doubled, capped at max_delay.
    assert list(retry.pauses(seeded(0))) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_retry_one_attempt_has_no_pause():
    assert list(Retry(attempts=1).pauses(seeded(0))) == []


def test_retry_pauses_with_jitter_vary_by_the_fraction_and_are_seeded():
    retry = Retry(attempts=5, delay=1.0, backoff=3.0, max_delay=5.0, jitter=0.25)
    first = list(retry.pauses(seeded(42)))
    assert first == list(retry.pauses(seeded(42)))  # deterministic given the rng
    assert first != list(retry.pauses(seeded(43)))
    base = [1.0, 3.0, 5.0, 5.0]
    assert len(first) == 4
    for pause, nominal in zip(first, base, strict=True):
        assert nominal * 0.75 <= pause <= nominal * 1.25
    # The exact values: each pause is nominal * (1 + uniform(-jitter, jitter)).
    rng = seeded(42)
    assert first == pytest.approx([n * (1 + rng.uniform(-0.25, 0.25)) for n in base])


def test_retry_jitter_spreads_over_the_whole_range():
    retry = Retry(attempts=2, delay=1.0, jitter=0.5)
    rng = seeded(7)
    pauses = [next(retry.pauses(rng)) for _ in range(2000)]
    assert min(pauses) < 0.55
    assert max(pauses) > 1.45
    assert all(0.5 <= p <= 1.5 for p in pauses)


@pytest.fixture
def sleeps(monkeypatch):
    """Record the pauses proclock sleeps instead of sleeping them."""
    recorded = []
    monkeypatch.setattr(_core, "sleep", recorded.append)
    return recorded


@pytest.fixture
def attempts(monkeypatch):
    """The attempts ProcessLock makes: each a LOCK_NB try, True if it then waited (bounded)."""
    from proclock.backends.flock import FlockBackend

    made = []
    real_try, real_wait = FlockBackend.try_acquire, FlockBackend.acquire

    def trying(spec):
        made.append(False)
        return real_try(spec)

    def waiting(spec, deadline):
        made[-1] = True
        return real_wait(spec, deadline)

    monkeypatch.setattr(FlockBackend, "try_acquire", staticmethod(trying))
    monkeypatch.setattr(FlockBackend, "acquire", staticmethod(waiting))
    return made


def test_retry_int_is_that_many_attempts_then_lock_held_error(lock_dir, sleeps, attempts):
    lock = ProcessLock("retried", blocking=False, retry=3)
    with held_by_another_description("retried"), pytest.raises(LockHeldError) as info:
        lock.acquire()
    assert type(info.value) is LockHeldError
    assert attempts == [False, False, False]  # three tries in all, each a single try
    assert len(sleeps) == 2  # pauses only between attempts
    assert not lock.locked


def test_retry_int_equals_retry_attempts(lock_dir, monkeypatch):
    schedules = []
    for retry in (3, Retry(attempts=3)):
        recorded = []
        monkeypatch.setattr(_core, "sleep", recorded.append)
        monkeypatch.setattr(proclock._policy, "random", seeded(1))
        with held_by_another_description("same"), pytest.raises(LockHeldError):
            ProcessLock("same", blocking=False, retry=retry).acquire()
        schedules.append(recorded)
    assert schedules[0] == schedules[1]
    assert len(schedules[0]) == 2
    assert 0.09 <= schedules[0][0] <= 0.11  # delay=0.1 ± 10 %
    assert 0.18 <= schedules[0][1] <= 0.22  # times backoff 2


def test_retry_sleeps_its_schedule_through_a_real_acquire(lock_dir, sleeps, attempts):
    retry = Retry(attempts=5, delay=0.5, backoff=2.0, max_delay=1.5, jitter=0)
    with held_by_another_description("sched"), pytest.raises(LockHeldError):
        ProcessLock("sched", blocking=False, retry=retry).acquire()
    assert sleeps == pytest.approx([0.5, 1.0, 1.5, 1.5])
    assert len(attempts) == 5


def test_retry_succeeds_once_the_holder_lets_go(lock_dir, monkeypatch, attempts):
    with held_by_another_description("late") as fd:
        recorded = []

        def sleep(pause):
            recorded.append(pause)
            if len(recorded) == 2:
                fcntl.flock(fd, fcntl.LOCK_UN)  # the holder releases during the 2nd pause

        monkeypatch.setattr(_core, "sleep", sleep)
        lock = ProcessLock("late", blocking=False, retry=Retry(4, jitter=0))
        with lock:
            assert lock.locked
        assert len(attempts) == 3  # fail, fail, succeed: no attempt after the success
        assert recorded == pytest.approx([0.1, 0.2])


def test_retry_each_attempt_is_one_wait_of_at_most_timeout(lock_dir, sleeps, attempts):
    lock = ProcessLock("waits", timeout=0.01, retry=Retry(3, delay=1, jitter=0))
    with held_by_another_description("waits"), pytest.raises(LockTimeoutError) as info:
        lock.acquire()
    assert attempts == [True, True, True]  # three bounded waits
    assert sleeps == pytest.approx([1, 2])
    assert info.value.waited < 5


def test_decorator_retry_then_on_contention(lock_dir, sleeps):
    seen = []
    wrapped = process_locked("deco-retry", blocking=False, retry=2, on_contention=seen.append)(body)
    with held_by_another_description("deco-retry"):
        assert wrapped() is None
    assert len(sleeps) == 1
    assert len(seen) == 1
    assert isinstance(seen[0], LockHeldError)


# -- blocking, timeout, and acquire()'s arguments ---------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"blocking": False}, id="blocking-False"),
        pytest.param({"timeout": 0}, id="timeout-0"),
        pytest.param({"blocking": True, "timeout": 0}, id="blocking-True-timeout-0"),
    ],
)
def test_one_attempt_gives_lock_held_error_not_timeout(lock_dir, options):
    with held_by_another_description("once"), pytest.raises(LockHeldError) as info:
        ProcessLock("once", **options).acquire()
    assert type(info.value) is LockHeldError
    assert not isinstance(info.value, TimeoutError)
    assert info.value.name == "once"
    assert info.value.path == str(lock_path("once"))


def test_expired_positive_timeout_gives_lock_timeout_error(lock_dir):
    with held_by_another_description("expires"), pytest.raises(LockTimeoutError) as info:
        ProcessLock("expires", timeout=0.01).acquire()
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, LockHeldError)
    assert info.value.name == "expires"
    assert str(lock_path("expires")) in str(info.value)


def test_decorator_timeout_gives_lock_timeout_error(lock_dir):
    wrapped = process_locked("deco-timeout", timeout=0.01)(body)
    with held_by_another_description("deco-timeout"), pytest.raises(LockTimeoutError):
        wrapped()


def test_acquire_defaults_to_the_constructor_options(lock_dir):
    with held_by_another_description("defaults"):
        with pytest.raises(LockHeldError) as info:
            ProcessLock("defaults", blocking=False).acquire()
        assert type(info.value) is LockHeldError
        with pytest.raises(LockTimeoutError):
            ProcessLock("defaults", timeout=0.01).acquire()
        # Per-call arguments override the constructor's.
        with pytest.raises(LockTimeoutError):
            ProcessLock("defaults", blocking=False).acquire(timeout=0.01)
        with pytest.raises(LockHeldError) as info:
            ProcessLock("defaults", timeout=30).acquire(blocking=False)
        assert type(info.value) is LockHeldError
        with pytest.raises(LockHeldError) as info:
            ProcessLock("defaults", timeout=30).acquire(timeout=0)
        assert type(info.value) is LockHeldError


def test_acquire_refuses_contradictory_arguments(lock_dir):
    lock = ProcessLock("args")
    with pytest.raises(ValueError):
        lock.acquire(blocking=False, timeout=1)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-1)
    assert not lock.locked


def test_explicit_timeout_none_waits_forever(lock_dir):
    lock = ProcessLock("forever", timeout=0.01)
    outcome = []

    def wait():
        try:
            lock.acquire(timeout=None)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append("held")
            lock.release()

    with held_by_another_description("forever"):
        waiter = threading.Thread(target=wait)
        waiter.start()
        waiter.join(0.2)  # twenty times the constructor's timeout
        assert waiter.is_alive()
        assert outcome == []
    waiter.join(30)
    assert outcome == ["held"]


# -- refusals name the option at fault ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        pytest.param({"lock_dir": 123}, TypeError, "lock_dir", id="lock_dir-int"),
        pytest.param({"shared": "yes"}, TypeError, "shared", id="shared-str"),
        pytest.param({"reentrant": 1}, TypeError, "reentrant", id="reentrant-int"),
        pytest.param({"mode": 600}, ValueError, "did you mean 0o600?", id="mode-decimal"),
        pytest.param({"mode": 0o400}, ValueError, "owner must be able to read and write", id="ro"),
    ],
)
def test_a_refusal_names_the_option(lock_dir, options, error, words):
    with pytest.raises(error, match=words.replace("?", r"\?")):
        ProcessLock("named", **options)


def test_a_positional_timeout_is_explained(lock_dir):
    with pytest.raises(TypeError, match=r"timeout is keyword-only: acquire\(timeout=5\)"):
        ProcessLock("positional").acquire(5)


def test_an_error_after_retries_says_how_many_attempts(lock_dir, sleeps):
    with held_by_another_description("tries"), pytest.raises(LockHeldError) as info:
        ProcessLock("tries", blocking=False, retry=3).acquire()
    assert info.value.attempts == 3
    assert "(3 attempts)" in str(info.value)
