"""Issue 13 item 3: the command line starts without torch, transformers or lm-eval (``--help`` in well
under 2 s), and the package's public names still import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tokenfilter

HEAVY = ("torch", "transformers", "lm_eval", "datasets", "matplotlib")
SRC = Path(tokenfilter.__file__).resolve().parents[1]


def _heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter and return the heavy packages it imported."""
    probe = f"{code}\nimport sys\nprint('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    last = done.stdout.splitlines()[-1].removeprefix("heavy:")
    return [m for m in last.split(",") if m]


def test_importing_the_cli_imports_no_heavy_package():
    assert _heavy_modules_after("import tokenfilter.cli") == []


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["study", "--help"], ["bench", "--help"]])
def test_help_imports_no_heavy_package(argv):
    code = f"import tokenfilter.cli as c\ntry:\n    c.main({argv!r})\nexcept SystemExit:\n    pass"
    assert _heavy_modules_after(code) == []


def test_bench_help_still_lists_its_options(capsys):
    from tokenfilter.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "--lengths" in capsys.readouterr().out


def test_public_names_import_lazily():
    from tokenfilter import TokenFilter

    assert TokenFilter(ratio=0.5).ratio == 0.5
    for name in tokenfilter.__all__:
        assert getattr(tokenfilter, name) is not None
    assert set(tokenfilter.__all__) <= set(dir(tokenfilter))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tokenfilter.nope  # noqa: B018
