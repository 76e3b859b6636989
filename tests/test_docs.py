"""Every ```python block of README.md and docs/*.md runs.

The blocks of one page run in order in one namespace, as a reader would type them into one
session: a later block may use what an earlier one defined. A block directly below an HTML
comment ``<!-- skip-test: why -->`` is not run; that is kept for blocks that cannot run on a
CPU-only machine in one process, and the comment must say why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip-test:\s*(\S.*?)\s*-->$")
MAX_SKIPPED = 4  # skips stay rare


def python_blocks(path: Path):
    """``(first line number, code, skip reason or None)`` of each ```python block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1)
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if language == "python":
            before = [line for line in lines[:start] if line.strip()]
            skip = SKIP.match(before[-1].strip()) if before else None
            blocks.append((start + 2, "\n".join(lines[start + 1:i]) + "\n",
                           skip.group(1) if skip else None))
        i += 1
    return blocks


def test_pages_have_blocks_and_skips_are_rare():
    blocks = {p.name: python_blocks(p) for p in PAGES}
    assert sum(len(b) for b in blocks.values()) >= 15
    skipped = [(page, line, why) for page, bs in blocks.items() for line, _, why in bs if why]
    assert len(skipped) <= MAX_SKIPPED, skipped
    for path in PAGES:  # a skip comment that is not right above a python block is a mistake
        comments = [line for line in path.read_text().splitlines()
                    if line.strip().startswith("<!-- skip-test")]
        assert len(comments) == sum(1 for _, _, why in python_blocks(path) if why), path.name


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    threads = torch.get_num_threads()
    try:
        for line, code, skip in blocks:
            if skip:
                continue
            # Padded so that a traceback names the page's own line numbers.
            exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            pytest.fail(f"{path.name}: a block left a process group initialized")
