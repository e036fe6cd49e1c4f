"""Every Python block of README.md and docs/*.md runs as written, against a live etcd.

The blocks are found when the tests are collected, so a new page is covered without a word
here. Each block runs as its own program (``python snippet.py`` in an empty directory) with
``$ETCD_RDZV_ENDPOINTS`` naming a fresh etcd, which is what ``etcd-rdzv serve`` tells a reader
to export; the blocks read it, falling back to ``localhost:2379``. A block that cannot run
here is marked in the Markdown, on the last line before its fence, with why::

    <!-- not-runnable: needs a 3-member cluster on h1, h2 and h3 -->

A marked block is still compiled, so its syntax cannot rot either.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcd_rdzv.cli import EXIT_NOT_TORCH_STATE
from etcd_rdzv.testing import EtcdServer

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_NOT_RUNNABLE = re.compile(r"^\s*<!--\s*not-runnable:\s*(?P<why>.*?)\s*-->\s*$")
_PYTHON = frozenset({"python", "py", "python3"})


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block of a Markdown page."""

    page: Path
    line: int
    """The line of its opening fence, from 1."""
    code: str
    not_runnable: str | None
    """Why it is not run, as the Markdown says; None: it runs."""

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippets_of(page: Path) -> list[Snippet]:
    """The Python blocks of ``page``, with the marker before each, if any."""
    found: list[Snippet] = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body, end = [], index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            line = lines[end]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            end += 1
        if opening["lang"].lower() in _PYTHON:
            before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = _NOT_RUNNABLE.match(before)
            found.append(Snippet(page, index + 1, "\n".join(body) + "\n",
                                 marker["why"] if marker else None))
        index = end + 1
    return found


SNIPPETS = [snippet for page in pages() for snippet in snippets_of(page)]


def run_snippet(snippet: Snippet, directory: Path, env: dict[str, str]) -> None:
    """Run ``snippet`` as a program in ``directory``; fail with its output unless it exits 0."""
    script = directory / "snippet.py"
    script.write_text(snippet.code)
    done = subprocess.run([sys.executable, str(script)], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"{snippet.name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


def snippet_env(**variables: str) -> dict[str, str]:
    base = {name: value for name, value in os.environ.items()
            if name not in ("ETCD_RDZV_ENDPOINTS", "ETCD_RDZV_PASSWORD")}
    return {**base, **variables}


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_python_snippet(snippet: Snippet, tmp_path: Path) -> None:
    compile(snippet.code, snippet.name, "exec")
    if snippet.not_runnable is not None:
        assert snippet.not_runnable, f"{snippet.name}: a not-runnable mark needs its reason"
        return
    with EtcdServer() as server:  # a fresh etcd: the run ids the snippets use are free
        run_snippet(snippet, tmp_path, snippet_env(ETCD_RDZV_ENDPOINTS=server.get_endpoint()))


def test_the_collector_finds_the_readmes_blocks() -> None:
    """A parser that found nothing would pass every page."""
    readme = [s for s in SNIPPETS if s.page.name == "README.md"]
    assert readme and all(s.not_runnable is None for s in readme)
    assert all("import" in s.code for s in readme)


def test_the_parser_reads_marks_and_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```python\nprint(1)\n```\n\n"
        "<!-- not-runnable: needs three hosts -->\n\n```py\nprint(2)\n```\n\n"
        "```sh\necho 3\n```\n\n"
        "- In a list:\n\n    ````python\n    if True:\n        print(4)\n    ````\n"
    )
    assert [(s.line, s.code, s.not_runnable) for s in snippets_of(page)] == [
        (3, "print(1)\n", None),
        (9, "print(2)\n", "needs three hosts"),
        (19, "if True:\n    print(4)\n", None),
    ]


def test_the_readme_as_a_new_user_runs_it(tmp_path: Path) -> None:
    """`etcd-rdzv serve` in one terminal, the README's blocks pasted in another, nothing
    exported: they reach it at localhost:2379. Then `etcd-rdzv status` on the run they wrote."""
    executable = str(Path(sys.executable).parent / "etcd-rdzv")
    serve = subprocess.Popen([executable, "serve"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=snippet_env())
    try:
        assert serve.stdout is not None
        banner = serve.stdout.readline()
        assert banner.startswith("etcd is serving on "), banner
        if not banner.startswith("etcd is serving on 127.0.0.1:2379 "):
            pytest.skip("port 2379 is taken on this machine: `serve` chose another one")
        for snippet in SNIPPETS:
            if snippet.page.name == "README.md":
                run_snippet(snippet, tmp_path, snippet_env())
        status = subprocess.run([executable, "status", "job-42"], capture_output=True,
                                text=True, timeout=60, env=snippet_env())
        # The README stores b"hello": not a state torch's handler wrote, and said so.
        assert status.returncode == EXIT_NOT_TORCH_STATE, status.stderr
        assert "is not a torch rendezvous state (5 bytes)" in status.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
