"""The documentation site's sources agree with the code, the README and CI.

Cheap checks only: `mkdocs build --strict` (broken links, anchors, missing API references) runs in
CI (.ci/run), not here.
"""

from __future__ import annotations

import ast
import re

import pytest

import proclock
from conftest import TESTS

ROOT = TESTS.parent
DOCS = ROOT / "docs"
MKDOCS = (ROOT / "mkdocs.yml").read_text()
README = (ROOT / "README.md").read_text()
# Pages written by other hands than the rest of the site, in the nav all the same.
NAV_ENTRY = re.compile(r"^\s*- (?:[^:\n]+: )?([\w./-]+\.md)\s*$", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def nav_pages() -> list[str]:
    nav = MKDOCS.split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    return NAV_ENTRY.findall(nav)


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav():
    pages = nav_pages()
    assert "index.md" in pages
    assert len(pages) == len(set(pages)), pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"in mkdocs.yml's nav but not in docs/: {missing}"
    written = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not written - set(pages), f"pages missing from the nav: {written - set(pages)}"


def test_the_nav_has_the_pages_the_site_promises():
    pages = set(nav_pages())
    for page in ("cli.md", "containers.md", "coming-from.md", "api.md", "changelog.md"):
        assert page in pages


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)$", api, re.MULTILINE))
    missing = [name for name in proclock.__all__ if f"proclock.{name}" not in documented]
    assert not missing, f"add `::: proclock.NAME` to docs/api.md for {missing}"
    for backend in ("Backend", "PostgresBackend", "RedisBackend"):
        assert f"proclock.backends.{backend}" in api


def test_the_changelog_page_includes_the_changelog():
    assert '--8<-- "CHANGELOG.md"' in (DOCS / "changelog.md").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert "keepachangelog.com" in changelog


def relative_links(text: str) -> list[str]:
    return [
        link.split("#", 1)[0]
        for link in LINK.findall(text)
        if "://" not in link and not link.startswith(("#", "mailto:"))
    ]


def test_the_readme_links_to_files_that_exist_and_to_every_guide_page():
    links = relative_links(README)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    linked = {link.removeprefix("docs/") for link in links if link.startswith("docs/")}
    unlinked = set(nav_pages()) - linked - {"changelog.md"}  # CHANGELOG.md itself is linked
    assert not unlinked, f"the README's Documentation section misses {unlinked}"


def test_links_between_pages_point_to_pages():
    for page in DOCS.rglob("*.md"):
        for link in relative_links(page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links to {link}"


def test_the_readme_starts_with_the_two_setup_commands_and_says_how_to_read_the_site():
    first_block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if not line.startswith("#")]
    assert len(commands) == 2
    assert all(line.startswith("python3 -m venv .venv && ") for line in commands)
    assert README.index("```sh\n") < README.index("\n## ")  # before any section
    assert "pip install -e '.[docs]' && mkdocs serve" in README


def optional_dependencies() -> dict[str, list[str]]:
    """pyproject.toml's extras (read from the source: an installed copy's metadata may be old)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def test_the_readme_and_the_quickstart_list_every_extra_and_what_it_pulls_in():
    extras = optional_dependencies()
    assert {"postgres", "redis", "docs", "test", "dev", "bench"} <= set(extras)
    installation = README.split("## Installation", 1)[1].split("\n## ", 1)[0]
    quickstart = (DOCS / "index.md").read_text()
    for extra, requirements in extras.items():
        for where, text in (("README.md", installation), ("docs/index.md", quickstart)):
            rows = [line for line in text.splitlines() if line.startswith(f"| `{extra}` |")]
            assert len(rows) == 1, f"{where}: no row (or several) for the {extra} extra"
            for requirement in requirements:
                name, _, inner = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].partition("[")
                # proclock[test,bench] pulls in other extras: the row names them instead.
                pulled = inner.rstrip("]").split(",") if name == "proclock" else [name]
                for package in pulled:
                    assert f"`{package}" in rows[0], f"{where}: the {extra} row misses {package}"


def test_the_extras_give_ci_what_it_runs():
    extras = optional_dependencies()

    def extra(name: str) -> set[str]:
        return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in extras[name]}

    assert {"mkdocs", "mkdocs-material", "mkdocstrings-python"} <= extra("docs")
    assert {"build", "twine"} <= extra("dev")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[docs]'" in ci
    assert re.search(r"^NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir ", ci, re.MULTILINE)
    assert "python -m build --outdir" in ci
    assert "twine check --strict" in ci
    assert "site/" in (ROOT / ".gitignore").read_text().split()


def logged_messages() -> list[tuple[str, str]]:
    """(level, message) of every call on the "proclock" logger in src/."""
    found = []
    for path in (ROOT / "src" / "proclock").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            level, target = node.func.attr, ast.unparse(node.func.value)
            if level not in {"debug", "info", "warning", "error", "exception", "critical"}:
                continue
            if target != "_log" and "getLogger('proclock')" not in target:
                continue
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((level.upper(), first.value))
    return found


def test_the_logging_page_documents_every_message():
    page = (DOCS / "logging.md").read_text()
    messages = logged_messages()
    assert len(messages) >= 8, messages
    for level, message in messages:
        # The message's fixed text up to its first argument, as the page quotes it; "%s" alone
        # is the LockLostError itself, documented by its own text.
        text = "was lost while held" if message == "%s" else message
        fixed = re.split(r"%[-0-9.]*[srdf]", text, maxsplit=1)[0].strip()
        rows = [line for line in page.splitlines() if line.startswith(f"| {level} |")]
        assert any(fixed in row for row in rows), f"{level} {message!r} is not on the page"
