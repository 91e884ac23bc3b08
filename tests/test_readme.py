"""Issue 13, item 5: the README's code runs as written.

Every ```python block of README.md is executed as it stands (the ones that load the built-in model are ``slow``),
and the shell commands it shows name files, console scripts and modules that exist.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tiny_lm import one_thread, smollm2_or_skip

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def code_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split at ``&&`` / ``;``."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||", "|"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(word)
    return out


def check_names_exist(cmd: list[str]) -> None:
    """The program and the files it is given exist (``.venv/bin/X`` = what install.sh puts there), and so does
    every module run with ``-m``."""
    program = cmd[0]
    if program.startswith(".venv/bin/"):
        assert program.removeprefix(".venv/bin/") in SCRIPTS | {"python", "pip", "ruff", "accelerate"}, program
    elif "/" in program:
        assert (ROOT / program).exists(), f"{program} does not exist"
    for i, word in enumerate(cmd[1:], start=1):
        if cmd[i - 1] == "-m":
            assert importlib.util.find_spec(word) is not None, f"no module {word}"
        elif program == "bash" or re.fullmatch(r"[\w./-]+\.(sh|txt|toml|py)", word):
            assert (ROOT / word).exists(), f"{word} does not exist"


PYTHON_BLOCKS = code_blocks("python")


def test_the_readme_has_the_snippets_it_is_checked_for():
    assert PYTHON_BLOCKS, "README.md has no ```python block"
    assert any("load_model()" in b and ".generate(" in b and "run.stats" in b for b in PYTHON_BLOCKS)


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=pytest.mark.slow) if "load_model(" in b else b for b in PYTHON_BLOCKS],
    ids=[f"python-block-{i}" for i in range(len(PYTHON_BLOCKS))],
)
def test_python_block_runs_as_written(block: str, capsys: pytest.CaptureFixture[str]) -> None:
    if "load_model()" in block:
        smollm2_or_skip()  # skips when the registry package with the built-in model is absent
    with one_thread():
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip(), "the snippet printed nothing"


def test_two_commands_name_files_that_exist():
    blocks = code_blocks("bash", section("Two commands"))
    assert len(blocks) == 1
    cmds = commands(blocks[0])
    assert [c[0] for c in cmds] == ["bash", ".venv/bin/tokenfilter", ".venv/bin/python"]
    assert cmds[0] == ["bash", "install.sh"]
    assert cmds[2] == [".venv/bin/python", "-m", "pytest", "-q"]  # the same command as .ci/run
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    for cmd in cmds:
        check_names_exist(cmd)


def test_every_shell_command_names_things_that_exist():
    for block in code_blocks("bash"):
        for cmd in commands(block):
            check_names_exist(cmd)
