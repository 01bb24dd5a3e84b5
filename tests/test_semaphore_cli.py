"""`proclock run --limit N`, and semaphores in `proclock status` and `proclock gc`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proclock import ProcessSemaphore
from test_cli import PROCLOCK, proclock

# Prints its slot, then holds it until its stdin closes.
HOLD = "import os, sys; print(os.environ['PROCLOCK_SLOT'], flush=True); sys.stdin.read()"


class Running:
    """`proclock run ARGS -- python -c HOLD`, holding its slot until `stop()`."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [PROCLOCK, "run", *args, "--", sys.executable, "-c", HOLD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.slot = int(line)

    def stop(self):
        self.proc.stdin.close()
        assert self.proc.wait(20) == 0
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def two_running(lock_dir):
    first, second = Running("-l", "2", "gpu"), Running("--limit", "2", "gpu")
    yield first, second
    first.stop()
    second.stop()


def test_run_exports_the_slot_and_holds_at_most_limit(two_running):
    first, second = two_running
    assert {first.slot, second.slot} == {0, 1}
    busy = proclock("run", "-n", "-l", "2", "gpu", "--", "true")
    assert busy.returncode == 1
    assert "semaphore 'gpu' (limit 2" in busy.stderr
    assert f"pid {first.proc.pid}" in busy.stderr
    assert f"pid {second.proc.pid}" in busy.stderr
    timed = proclock("run", "-w", "0.2", "-E", "7", "-l", "2", "gpu", "--", "true")
    assert timed.returncode == 7
    assert "gave up after" in timed.stderr


def test_a_freed_slot_is_the_next_commands(lock_dir):
    first = Running("-l", "2", "gpu")
    second = Running("-l", "2", "gpu")
    freed = first.slot
    first.stop()
    third = Running("-w", "10", "-l", "2", "gpu")
    assert third.slot == freed
    second.stop()
    third.stop()


def test_status_shows_the_semaphore_and_each_slots_holder(two_running):
    first, second = two_running
    out = proclock("status", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    summary = rows[0]
    assert summary["kind"] == "semaphore"
    assert summary["name"] == "gpu"
    assert summary["limit"] == 2
    assert summary["state"] == "2/2 held"
    slots = {row["slot"]: row["pid"] for row in rows[1:]}
    assert slots == {first.slot: first.proc.pid, second.slot: second.proc.pid}
    assert [row for row in rows if row.get("semaphore") != "gpu" and row is not summary] == []
    text = proclock("status", "gpu")
    assert text.returncode == 0
    assert "2/2 held" in text.stdout
    assert "gpu [slot 0]" in text.stdout
    assert "gpu [slot 1]" in text.stdout


def test_a_limit_other_than_the_recorded_one_is_refused(two_running):
    out = proclock("run", "-l", "3", "gpu", "--", "true")
    assert out.returncode == 2
    assert "limit=2" in out.stderr
    assert "limit=3" in out.stderr


def test_usage_errors_name_the_option(lock_dir):
    for args, text in (
        (["-l", "0", "gpu"], "at least 1 slot"),
        (["-l", "two", "gpu"], "invalid limit"),
        (["-l", "2", "-s", "gpu"], "--limit"),
        (["-l", "2", "--path", str(lock_dir / "f")], "--limit"),
    ):
        out = proclock("run", *args, "--", "true")
        assert out.returncode == 2, args
        assert text in out.stderr, (args, out.stderr)


def test_gc_removes_a_semaphores_files_together_and_only_when_free(lock_dir):
    held = Running("-l", "2", "gpu")
    try:
        with ProcessSemaphore("other", limit=3):
            pass
        files = sorted(os.listdir(lock_dir))
        out = proclock("gc")
        assert out.returncode == 0, out.stderr
        left = sorted(os.listdir(lock_dir))
        # "gpu" (one slot held) keeps every file; "other" (free) lost all of its own.
        assert [f for f in left if f.startswith("gpu_")] == [
            f for f in files if f.startswith("gpu_")
        ]
        assert [f for f in left if f.startswith("other_")] == []
        assert out.stdout.count("removed") == 2  # the turnstile and the one slot file used
    finally:
        held.stop()
    out = proclock("gc")
    assert out.returncode == 0
    assert os.listdir(lock_dir) == []


def test_status_of_an_unused_name_is_a_free_lock(lock_dir):
    out = proclock("status", "--json", "nothing")
    assert json.loads(out.stdout)[0]["state"] == "free"
    assert Path(lock_dir).exists()
