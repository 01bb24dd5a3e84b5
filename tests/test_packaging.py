"""What an installed proclock says about itself: its version, its licence."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import metadata, version

from conftest import TESTS

ROOT = TESTS.parent


def test_version_is_the_installed_one_and_read_lazily():
    code = (
        "import sys, proclock; assert 'importlib.metadata' not in sys.modules; "
        "print(proclock.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == version("proclock")


def test_the_command_line_prints_its_version():
    out = subprocess.run(
        [sys.executable, "-m", "proclock", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == f"proclock {version('proclock')}"


def test_licence_and_classifiers():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    meta = metadata("proclock")
    classifiers = meta.get_all("Classifier") or []
    assert any(c.startswith("Development Status") for c in classifiers)
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert meta.get("Keywords")
