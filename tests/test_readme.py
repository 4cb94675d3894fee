"""The README's Python blocks run as written: every ```python block, in order, in one fresh
process whose working directory holds only the shipped recipes (so what they write lands in a
temp folder), on the demo model. A block that stops working fails here, naming it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO

pytest.importorskip("llmcompressor")

RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
for number, (line, code) in enumerate(blocks, 1):
    try:
        exec(compile(code, f"README.md block {number} (line {line})", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README.md block {number} (line {line}) failed")
print("blocks run:", len(blocks))
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return blocks


def test_readme_has_python_blocks():
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    assert any("oneshot(" in code for _, code in blocks)


def test_every_python_block_of_the_readme_runs(tmp_path):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    shutil.copytree(REPO / "src" / "unipruning_modifier" / "recipes", tmp_path / "recipes")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", RUNNER, "blocks.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"blocks run: {len(blocks)}" in done.stdout
    assert (tmp_path / "demo-24" / "config.json").is_file()
    assert (tmp_path / "demo-24" / "tokenizer_config.json").is_file()
