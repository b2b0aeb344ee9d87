"""What git tracks: source, never what a run produces.

Logs, databases, lock and pid files, credentials and keys belong to a machine's run
(`~/.local/state/usagepipe`), not to the repository: a tracked one leaks passwords or
goes stale in every clone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = re.compile(
    r"(\.log|\.db|\.sqlite3?|\.lock|\.pid|\.pem|\.key|\.jsonl)$"
    r"|(^|/)(credentials[^/]*\.json|dynamic-security\.json|owner_key_secrets?)$"
    r"|(^|/)\.run/"
)


def tracked() -> list[str]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.fail("the repository checks need git and a git checkout")
    out = subprocess.run(
        [git, "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    return [name for name in out.split("\0") if name]


def test_no_tracked_file_is_runtime_state_or_a_secret() -> None:
    assert [name for name in tracked() if RUNTIME.search(name)] == []


def test_gitignore_has_no_inline_comments() -> None:
    # git reads `x  # note` as one pattern, which then matches nothing.
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert [line for line in lines if not line.startswith("#") and " #" in line] == []


def test_the_run_directory_is_ignored() -> None:
    git = shutil.which("git")
    assert git is not None
    probe = subprocess.run(
        [git, "check-ignore", "-q", "--no-index", ".run/services.lock"], cwd=ROOT, check=False
    )
    assert probe.returncode == 0
