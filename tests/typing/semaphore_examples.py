"""docs/semaphore.md's examples, checked by `mypy --strict` in CI and run by test_semaphore.py."""

from __future__ import annotations

import asyncio
import os

import proclock
from proclock import ProcessSemaphore, SemaphoreFullError, SlotHolder, process_limited


@process_limited("gpu", limit=2)
def infer(batch: list[int]) -> str:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(proclock.current_slot("gpu"))
    return os.environ["CUDA_VISIBLE_DEVICES"] + str(len(batch))


@process_limited("export-{tenant}", limit=4, timeout=60)
def export(tenant: str) -> str:
    return tenant


@process_limited("fetch", limit=3, blocking=False, on_contention="skip")
async def fetch(url: str) -> str:
    return url


def with_a_slot() -> int:
    with ProcessSemaphore("gpu", limit=2, timeout=30) as slot:
        index: int = slot.index
    holders: list[SlotHolder] = ProcessSemaphore("gpu", limit=2).holders()
    return index + len(holders)


def full() -> str:
    try:
        with ProcessSemaphore("gpu", limit=2, blocking=False):
            return "ran"
    except SemaphoreFullError as error:
        return f"{error.limit} {error.holders}"


async def awaited() -> int:
    async with ProcessSemaphore("gpu", limit=2) as slot:
        return slot.index


def run_all() -> None:
    assert infer([1, 2]) == "02"
    assert export("acme") == "acme"
    assert asyncio.run(fetch("u")) == "u"
    assert with_a_slot() == 0
    assert full() == "ran"
    assert asyncio.run(awaited()) == 0
