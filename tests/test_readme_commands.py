"""README.md's "## Command line" block against the real CLI parser: every documented command line
parses (metavariables replaced by small placeholder values), and every subcommand is documented."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from memagent_jax import cli

README = Path(__file__).resolve().parent.parent / "README.md"

#: Placeholder values for the README's metavariables (longest names first when substituting).
PLACEHOLDERS = {
    "T1,T2": "niah_single_1,niah_single_2", "L1,L2": "1024,2048", "RUN_DIR": "runs/x",
    "CONFIG": "memagent", "STAGE": "rl", "TASK": "multivalue", "NAME": "overwrite", "TEXT": "q", "FILE": "doc.txt",
    "DIR": "out", "N": "2", "G": "80", "T": "v5p-8", "key=value ...": "rl.kl_coef=0.001", "key=value": "rl.kl_coef=0.001",
}


def command_block(text: str) -> list[str]:
    """The command lines of the first code block under "## Command line" (comments dropped)."""
    section = text.split("## Command line", 1)[1]
    block = section.split("```", 2)[1]
    lines = []
    for raw in block.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("memagent-jax"):
            lines.append(line)
    return lines


def concrete_argv(line: str) -> list[str]:
    """A README line as argv: optional parts kept (brackets dropped), metavariables filled in."""
    line = line.replace("[", " ").replace("]", " ")
    for name in sorted(PLACEHOLDERS, key=len, reverse=True):
        line = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", PLACEHOLDERS[name], line)
    return shlex.split(line)[1:]  # drop the program name


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def problem(line: str) -> str | None:
    """Why a README line does not match the CLI, or None.

    The line must parse, and each `--flag` must be an option of its command spelled in full
    (argparse would also accept an abbreviation of a renamed flag).
    """
    argv = concrete_argv(line)
    try:
        cli.parse_args(argv)
    except SystemExit as e:
        if e.code:
            return f"argparse exit {e.code} for {argv}"
    sub = subcommands(cli.build_parser())[next(a for a in argv if not a.startswith("-"))]
    known = {s for a in sub._actions for s in a.option_strings}
    unknown = [a for a in argv if a.startswith("--") and a not in known]
    return f"{unknown[0]} is not an option of {sub.prog}" if unknown else None


LINES = command_block(README.read_text())
COMMAND_LINES = [ln for ln in LINES if "COMMAND" not in ln]


def test_the_block_is_found():
    assert len(COMMAND_LINES) >= 7, LINES


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_readme_line_parses(line, capsys):
    why = problem(line)
    assert why is None, f"README line does not match the CLI ({why}): {line}\n{capsys.readouterr().err}"


def test_every_subcommand_is_documented():
    documented = {concrete_argv(ln)[0] for ln in COMMAND_LINES}
    assert set(subcommands(cli.build_parser())) <= documented, documented


def test_debug_is_global_and_per_command():
    parser = cli.build_parser()
    assert "--debug" in {s for a in parser._actions for s in a.option_strings}
    assert "[--debug]" in LINES[0] and "COMMAND" in LINES[0]
    for name, sub in subcommands(parser).items():
        assert "--debug" in {s for a in sub._actions for s in a.option_strings}, name


@pytest.mark.parametrize("old,new", [("--chunk-size", "--chunk"), ("--hbm-gib", "--hbm"),
                                     ("export", "exports"), ("--data-dir", "--dir")])
def test_a_renamed_flag_or_command_fails(old, new, capsys):
    """The check would catch a README that drifted from the CLI."""
    drifted = [ln.replace(old, new) for ln in COMMAND_LINES if old in ln]
    assert drifted
    assert any(problem(ln) for ln in drifted)
