"""A small real demo: four processes share one counter file through @process_locked.

Then a @singleton_process script is started twice: the second instance is refused.
Run: python examples/demo.py
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from proclock import process_locked

WORKERS, ROUNDS = 4, 500


@process_locked("demo-counter")
def bump(counter: Path) -> None:
    """Read, add one, write back: without the lock, concurrent bumps would be lost."""
    value = int(counter.read_text() or 0)
    counter.write_text(str(value + 1))


def worker(counter: Path) -> None:
    for _ in range(ROUNDS):
        bump(counter)


SINGLETON = textwrap.dedent(
    """
    import sys
    from proclock import singleton_process

    @singleton_process
    def main():
        print("instance 1: running; holding the program's lock until stdin closes", flush=True)
        sys.stdin.read()

    main()
    """
)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        counter = Path(tmp, "counter.txt")
        counter.write_text("0")
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(counter,)) for _ in range(WORKERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        total = int(counter.read_text())
        print(
            f"{WORKERS} processes x {ROUNDS} locked increments = {total} (expected "
            f"{WORKERS * ROUNDS}, lost updates: {WORKERS * ROUNDS - total})"
        )

        script = Path(tmp, "nightly.py")
        script.write_text(SINGLETON)
        first = subprocess.Popen(  # noqa: S603
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert first.stdout is not None  # noqa: S101
        print(first.stdout.readline().strip())
        second = subprocess.run(  # noqa: S603
            [sys.executable, str(script)], capture_output=True, text=True, check=False
        )
        print(f"instance 2: exit status {second.returncode}, stderr: {second.stderr.strip()}")
        first.communicate("")
        return 0 if total == WORKERS * ROUNDS and second.returncode == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
