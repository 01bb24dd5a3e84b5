"""Retry and the other options, validated once when a lock or decorator is made."""

from __future__ import annotations

import math

from ._record import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    import random as _random_module
    from collections.abc import Iterator
    from typing import Any


def _number(option: str, value: object, *, minimum: float, allow_equal: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{option} must be a number, not {type(value).__name__}"
        raise TypeError(msg)
    v = float(value)
    if math.isnan(v) or v < minimum or (not allow_equal and v == minimum) or math.isinf(v):
        bound = ">=" if allow_equal else ">"
        msg = f"{option} must be a finite number {bound} {minimum:g}, got {value!r}"
        raise ValueError(msg)
    return v


class Retry(Frozen):
    """What to do after an attempt fails: sleep, then try again, `attempts` times in all.

    `delay` is the pause before the second attempt; each later pause is multiplied by
    `backoff`, capped at `max_delay`, and varied by up to ±`jitter` (a fraction of the pause).
    `retry=3` is `Retry(attempts=3)`. Each attempt waits as the lock's `blocking`/`timeout`
    say, so a retried lock needs `blocking=False` or a timeout; the `LockHeldError` raised
    when all attempts failed says how many were made (`.attempts`).

    Args:
        attempts: attempts in all, >= 1 (1: no retry).
        delay: seconds before the second attempt, >= 0.
        backoff: factor applied to each later pause, >= 1.
        max_delay: the longest pause before jitter, >= 0.
        jitter: fraction of each pause added or removed at random, 0 to 1.

    Raises:
        TypeError, ValueError: a value out of range, naming the field (`Retry(attempts=)`).
    """

    __slots__ = ("attempts", "delay", "backoff", "max_delay", "jitter")  # noqa: RUF023
    attempts: int
    delay: float
    backoff: float
    max_delay: float
    jitter: float

    def __init__(
        self,
        attempts: int,
        delay: float = 0.1,
        backoff: float = 2.0,
        max_delay: float = 10.0,
        jitter: float = 0.1,
    ) -> None:
        self._init(
            attempts=attempts, delay=delay, backoff=backoff, max_delay=max_delay, jitter=jitter
        )
        self._check()

    def _check(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            msg = f"Retry(attempts=) must be an int, not {type(self.attempts).__name__}"
            raise TypeError(msg)
        if self.attempts < 1:
            msg = f"Retry(attempts=) counts all attempts and must be >= 1, got {self.attempts}"
            raise ValueError(msg)
        _number("Retry(delay=)", self.delay, minimum=0)
        _number("Retry(backoff=)", self.backoff, minimum=1)
        _number("Retry(max_delay=)", self.max_delay, minimum=0)
        jitter = _number("Retry(jitter=)", self.jitter, minimum=0)
        if jitter > 1:
            msg = f"Retry(jitter=) is a fraction of the pause, 0..1, got {self.jitter!r}"
            raise ValueError(msg)

    def pauses(self, rng: _random_module.Random | None = None) -> Iterator[float]:
        """The `attempts - 1` pauses between attempts, in seconds."""
        uniform = (rng or _random()).uniform
        pause = float(self.delay)
        for _ in range(self.attempts - 1):
            capped = min(pause, self.max_delay)
            yield max(0.0, capped * (1 + uniform(-self.jitter, self.jitter)))
            pause *= self.backoff


# The random module, imported on first use (~2 ms of import time otherwise); tests may put a
# seeded random.Random here.
random: Any = None


def _random() -> Any:
    global random  # noqa: PLW0603
    if random is None:
        import random as module  # noqa: PLC0415

        random = module
    return random


ONE_ATTEMPT = Retry(attempts=1)
_PERMISSIONS = 0o777
_OWNER_RW = 0o600


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    return _number("timeout", timeout, minimum=0)


def check_retry(retry: object) -> Retry:
    if retry is None:
        return ONE_ATTEMPT
    if isinstance(retry, Retry):
        return retry
    if isinstance(retry, int) and not isinstance(retry, bool):
        return Retry(attempts=retry)
    msg = f"retry must be a Retry or an int of attempts, not {type(retry).__name__}"
    raise TypeError(msg)


def check_wait(*, blocking: object, timeout: float | None, retry: Retry) -> None:
    """Refuse combinations that contradict each other, when the lock or decorator is made."""
    if not isinstance(blocking, bool):
        msg = f"blocking must be True or False, not {blocking!r}"
        raise TypeError(msg)
    if not blocking and timeout is not None:
        msg = (
            f"blocking=False with timeout={timeout:g} contradict each other: blocking=False "
            "is one try; drop the timeout, or use blocking=True with it"
        )
        raise ValueError(msg)
    if retry.attempts > 1 and blocking and timeout is None:
        msg = (
            "retry with an unbounded wait (blocking=True, timeout=None) would never retry: "
            "set a timeout for each attempt, or blocking=False"
        )
        raise ValueError(msg)


def check_mode(mode: object) -> int:
    """Permission bits (0..0o777) that let the owner read and write the lock file.

    Anything else (a decimal 600 by mistake, setuid bits, a read-only 0o400) would make the
    lock file unusable for the next process, so it is refused when the lock is made.
    """
    if isinstance(mode, bool) or not isinstance(mode, int):
        msg = f"mode must be file permission bits such as 0o600, not {mode!r}"
        raise ValueError(msg)  # noqa: TRY004  (one error for every unusable mode, as before)
    if 0 <= mode <= _PERMISSIONS and mode & _OWNER_RW == _OWNER_RW:
        return mode
    hint = ""
    digits = str(mode)
    if mode > 0 and set(digits) <= set("01234567"):
        octal = int(digits, 8)
        if octal <= _PERMISSIONS and octal & _OWNER_RW == _OWNER_RW:
            hint = f"; did you mean 0o{digits}?"
    if not 0 <= mode <= _PERMISSIONS:
        why = "only permission bits (0o000 to 0o777) can be given"
    else:
        why = "the owner must be able to read and write the lock file (include 0o600)"
    msg = f"mode={mode!r} ({mode:#o}) cannot be a lock file's mode: {why}{hint}"
    raise ValueError(msg)
