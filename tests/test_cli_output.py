"""The command's output and start-up (issue 16, item 3): stdout holds the report and, last, one
JSON line; the libraries' logs go to stderr, none with --quiet; --help answers without importing
torch, transformers or llm-compressor; ``import unipruning_modifier`` still registers the
modifiers for recipes; ``unipruning recipes`` lists the built-in recipes; help text is plain."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from unipruning_modifier.cli import build_parser, main
from unipruning_modifier.cli.recipes import builtin_names

from .conftest import REPO

FAST = ["--num-samples", "4", "--seq-len", "64", "--eval-window", "128", "--eval-tokens", "1024"]
HEAVY = ("torch", "transformers", "llmcompressor")


def python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)


def unipruning(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unipruning_modifier.cli", *argv], capture_output=True, text=True, timeout=timeout
    )


def test_help_imports_nothing_heavy_and_answers_fast():
    proc = python(
        f"""
        import sys, contextlib, io
        from unipruning_modifier.cli import main
        for argv in (["--help"], ["prune", "--help"], ["extract", "--help"], ["eval", "--help"], ["recipes", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit:
                    pass
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    start = time.perf_counter()
    proc = unipruning("--help")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("usage: unipruning")
    assert seconds < 2.0, f"unipruning --help took {seconds:.1f} s"
    proc = unipruning("prune", "--num-samples", "0", "--output", "/nonexistent-folder/out")  # a usage error: as fast
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "unipruning prune: error: --num-samples must be >= 1, got 0"


@pytest.mark.parametrize(
    "first",
    [
        "import unipruning_modifier\nimport llmcompressor",  # the package first: registered when llm-compressor comes
        "import llmcompressor\nimport unipruning_modifier",  # llm-compressor first: registered at once
        "from unipruning_modifier import UniPruningModifier",  # our modifier module brings llm-compressor in
    ],
)
def test_import_registers_the_modifiers_for_recipes(first):
    recipe = (
        "s_stage:\\n  s_modifiers:\\n    UniPruningModifier: {mask_structure: '2:4'}\\n"
        "q_stage:\\n  q_modifiers:\\n    MaskedGPTQModifier: {targets: [Linear], scheme: W8A8}\\n"
    )
    proc = python(
        f"""
        import sys
        {first.replace(chr(10), chr(10) + "        ")}
        from llmcompressor.recipe import Recipe
        print([type(m).__name__ for m in Recipe.create_instance("{recipe}").modifiers])
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['UniPruningModifier', 'MaskedGPTQModifier']"
    assert "does not import" not in proc.stderr


def test_import_alone_is_light():
    proc = python(f"import sys, unipruning_modifier; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_help_text_is_plain_with_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    parser = build_parser()
    texts = [parser.format_help()]
    commands = next(a for a in parser._actions if a.dest == "command").choices
    texts += [sub.format_help() for sub in commands.values()]
    for text in texts:
        assert "``" not in text and "(default: None)" not in text and "(default: False)" not in text
    prune_help = " ".join(commands["prune"].format_help().split())
    for needle in ("--eval-window W tokens per perplexity window (default: 512)",
                   "--eval-tokens T at most this many evaluation tokens (default: 65536)",
                   "--output DIR folder for the pruned checkpoint (default: pruned-model)",
                   "--recipe FILE_OR_NAME YAML file or built-in recipe name; unipruning recipes lists them (default: uni_24)"):
        assert needle in prune_help
    assert set(commands) == {"prune", "extract", "eval", "recipes"}


def test_recipes_lists_every_builtin_on_one_line(capsys):
    assert main(["recipes"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert list(result["recipes"]) == builtin_names() and "uni_24" in result["recipes"]
    for name in builtin_names():
        line = next(line for line in lines if line.startswith(name + " "))
        assert line.split(None, 1)[1] == result["recipes"][name] and result["recipes"][name].startswith("UniPruning")
    assert err == ""


@pytest.mark.slow
@pytest.mark.parametrize("verbosity", ["--verbose", "--quiet"])
def test_stdout_is_the_report_and_logs_go_to_stderr(tmp_path, tiny_model_path, verbosity):
    proc = unipruning(
        "prune", "--model", tiny_model_path, "--recipe", "uni_24_fp8", "--output", str(tmp_path / "out"), *FAST, verbosity
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["sparsity"] == pytest.approx(0.5)
    assert lines[0].startswith("Pruned ") and lines[-2].startswith("perplexity ")
    assert all(re.fullmatch(r"  \S.*\s\d+\.\d\d%", line) for line in lines[1:-2]), lines  # the per-layer table
    if verbosity == "--quiet":
        assert proc.stderr == ""
    else:  # llm-compressor's log lines (ours among them) and our progress, all on stderr
        assert "UniPruning model.layers.0.self_attn.q_proj: sparsity 0.5000" in proc.stderr
        assert "loading " in proc.stderr and "perplexity of the dense model" in proc.stderr
