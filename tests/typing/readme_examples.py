"""The README's examples, checked by `mypy --strict` in CI and run by tests/test_readme.py."""

from __future__ import annotations

import asyncio
import os

import proclock
from proclock import (
    Holder,
    ProcessLock,
    ProcessSemaphore,
    Retry,
    lock_path,
    process_limited,
    process_locked,
    singleton_process,
)


@process_locked
def refresh_cache() -> int:
    return 1


@process_locked("billing-export", timeout=30)
def export() -> str:
    return "exported"


@process_locked("sync-{account_id}")
def sync(account_id: int, dry_run: bool = False) -> tuple[int, bool]:
    return account_id, dry_run


@process_locked(blocking=False, on_contention="skip")
def maybe_compact() -> None:
    return None


@process_locked(shared=True, retry=Retry(attempts=3), timeout=1)
def read_report() -> list[str]:
    return []


# A lambda's parameters have no types: pyright's strict mode says so in the caller's code.
@process_locked(name=lambda account_id: f"acct-{account_id}")  # pyright: ignore[reportUnknownLambdaType, reportUnknownArgumentType]
async def refresh_account(account_id: int) -> int:
    return account_id


@singleton_process
def main() -> int:
    return 0


def use_lock() -> Holder | None:
    with ProcessLock("name", timeout=5) as lock:
        who: Holder | None = lock.holder()
        assert lock.locked
    with lock.acquire(timeout=1):
        pass
    print(lock_path("billing-export"), lock.path)
    return who


async def use_async() -> int:
    async with ProcessLock("name", timeout=5):
        return await refresh_account(7)


@process_limited("gpu", limit=2)  # at most 2 calls at once, across processes
def infer(batch: list[str]) -> str:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(proclock.current_slot("gpu"))  # 0 or 1
    return os.environ["CUDA_VISIBLE_DEVICES"]


def use_semaphore() -> int:
    with ProcessSemaphore("gpu", limit=2, timeout=30) as slot:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot.index)  # distinct among the holders
        return slot.index


def run_all() -> None:
    assert infer(["x"]) in {"0", "1"}
    assert use_semaphore() in {0, 1}
    total: int = refresh_cache() + main()
    label: str = export()
    pair: tuple[int, bool] = sync(1)
    maybe_compact()
    rows: list[str] = read_report()
    use_lock()
    value: int = asyncio.run(use_async())
    assert (total, label, pair, rows, value) == (1, "exported", (1, False), [], 7)
