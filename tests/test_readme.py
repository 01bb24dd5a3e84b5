"""The README's examples run, and its two set-up commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import TESTS

ROOT = TESTS.parent


def test_readme_examples_run(lock_dir):
    sys.path.insert(0, str(TESTS / "typing"))
    try:
        import readme_examples

        readme_examples.run_all()
    finally:
        sys.path.remove(str(TESTS / "typing"))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(
        r"^python3 -m venv .venv && \. \.venv/bin/activate && (.+)$", readme, re.MULTILINE
    )
    assert len(commands) == 2, commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_demo_runs(lock_dir):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "lost updates: 0" in out.stdout
    assert "exit status 1" in out.stdout
