"""The docs cannot rot: runnable examples run, links resolve, CI runs the README's test command.

A fenced ``bash`` block right after a ``<!-- runnable -->`` line in README.md or docs/*.md is
run here, one command per line (``\\`` continues a line, ``#`` starts a comment). ``python -m
MODULE ...`` commands run in this process through ``runpy`` (one torch import for all of them,
the module's real ``__main__`` path); anything else runs in a shell.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```(?:bash|sh|console)\n(.*?)```", re.S)


def runnable_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in RUNNABLE.findall(page.read_text()):
            for command in block.replace("\\\n", " ").splitlines():
                words = shlex.split(command, comments=True)
                if words:
                    found.append((page.relative_to(REPO).as_posix(), shlex.join(words)))
    return found


COMMANDS = runnable_commands()


def test_the_docs_mark_runnable_examples() -> None:
    pages = {page for page, _ in COMMANDS}
    assert {"docs/schedules.md", "docs/partitioner.md", "docs/memory.md"} <= pages, pages


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_runnable_example(page: str, command: str, monkeypatch) -> None:
    words = shlex.split(command)
    if words[:2] == ["python", "-m"]:
        monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            runpy.run_module(words[2], run_name="__main__", alter_sys=True)
            raise SystemExit(0)  # a module that returns instead of exiting succeeded
        assert done.value.code in (0, None), f"{page}: `{command}` exited {done.value.code}\n{out.getvalue()[-2000:]}"
        assert out.getvalue().strip(), f"{page}: `{command}` printed nothing"
    else:
        proc = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{page}: `{command}`\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def test_readme_is_the_entry_page_and_its_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150, "README.md is the entry page: move details to docs/"
    for page in PAGES:
        for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = next(line for line in readme.splitlines()
                        if line.startswith("pip install") and "[test]" in line and "pytest" in line)
    assert test_command in ci.splitlines(), "CI must run the README's test command verbatim"
    assert "python3 -m venv" in ci and "--system-site-packages" not in ci
