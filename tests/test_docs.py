"""docs/cli.md stays true: every command's flag table lists exactly the long flags of its ``--help``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.subprocess]  # each test runs a --help

REPO = Path(__file__).resolve().parents[1]
CLI_MD = REPO / "docs" / "cli.md"
# heading in docs/cli.md -> arguments after ``python -m``
COMMANDS = {
    "generate": ["mdi_mpi.generate"],
    "serve": ["mdi_mpi.serve"],
    "perplexity": ["mdi_mpi.perplexity"],
    "plan": ["mdi_mpi.plan"],
    "split": ["mdi_mpi.split"],
    "bench": ["mdi_mpi.bench"],
    "trace summary": ["mdi_mpi.trace", "summary"],
    "trace plot": ["mdi_mpi.trace", "plot"],
}
SHARED = "shared flags"  # the table that generate, serve and perplexity take in, instead of repeating it
TAKES_SHARED = "Takes the [shared flags](#shared-flags)"
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
HEADING = re.compile(r"^(#{2,3})\s+(.+?)\s*$")


def sections(text: str) -> dict[str, list[str]]:
    """Each ``##``/``###`` heading (lower case, backticks dropped) -> its lines up to the next one."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = HEADING.match(line)
        if m:
            current = m.group(2).replace("`", "").strip().lower()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def table_flags(lines: list[str]) -> set[str]:
    """The long flags in the first column of the section's first table (header and rule skipped)."""
    rows: list[str] = []
    for line in lines:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    assert len(rows) >= 2, "no flag table"
    flags: set[str] = set()
    for row in rows[2:]:
        flags |= set(FLAG.findall(row.strip("|").split("|")[0]))
    return flags


def doc_flags(command: str) -> set[str]:
    secs = sections(CLI_MD.read_text())
    assert command in secs, f"docs/cli.md has no section '## {command}'"
    lines = secs[command]
    flags = table_flags(lines)
    if any(line.startswith(TAKES_SHARED) for line in lines):
        flags |= table_flags(secs[SHARED])
    return flags - {"--help"}


def help_flags(args: list[str]) -> set[str]:
    """Long flags of the option lines of ``--help``: argparse indents an option by two spaces and
    its help text, wrapped, by more, so a flag named in the help text is not counted."""
    env = {**os.environ, "COLUMNS": "100"}
    out = subprocess.run([sys.executable, "-m", *args, "--help"], capture_output=True, text=True,
                         timeout=100, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    flags: set[str] = set()
    for line in out.stdout.splitlines():
        if re.match(r"^  -", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            flags |= set(FLAG.findall(invocation))
    return flags - {"--help"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_flag_table_matches_help(command):
    documented, actual = doc_flags(command), help_flags(COMMANDS[command])
    assert documented == actual, (f"docs/cli.md '{command}': missing {sorted(actual - documented)}, "
                                  f"not in --help {sorted(documented - actual)}")
