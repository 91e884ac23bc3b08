"""The peer venv: a second Python environment holding kvpress and the transformers version it pins.

All pinned versions live in :data:`PINS`. ``torch`` must stay pinned: the CPU wheel of that version lies on
local disk, an unpinned one would pull a multi-GB CUDA build from the registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenfilter.builtin_models import cache_dir

PINS: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "5.2.0",
    "kvpress": "0.5.5",
    "gguf": "0.19.0",
    "sentencepiece": "0.2.3",
}
SETUP_COMMAND = "tokenfilter peers --setup"
VENV_NAME = "peers-venv"
_STAMP = "tokenfilter-peers.json"  # written last by a successful setup: the pins it installed


class PeerEnvError(RuntimeError):
    """The peer venv is missing or broken; the message names the command that fixes it."""


@dataclass(frozen=True)
class PeerEnv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.root / _STAMP


def venv_dir() -> Path:
    """Where the peer venv lives: ``$TOKENFILTER_CACHE/peers-venv`` (else the user cache, see ``cache_dir``)."""
    return cache_dir() / VENV_NAME


def requirements() -> list[str]:
    return [f"{name}=={version}" for name, version in PINS.items()]


def installed_pins(root: Path | None = None) -> dict[str, str] | None:
    """The pins a finished setup recorded in ``root``, or None when there is none."""
    env = PeerEnv(root or venv_dir())
    if not env.stamp.exists() or not env.python.exists():
        return None
    try:
        return json.loads(env.stamp.read_text(encoding="utf-8")).get("pins")
    except (OSError, ValueError):
        return None


def check(root: Path | None = None, import_check: bool = False) -> PeerEnv:
    """The ready peer venv, or ``PeerEnvError`` in one sentence naming the fixing command.

    ``import_check`` also imports kvpress inside it (a few seconds).
    """
    env = PeerEnv(root or venv_dir())
    pins = installed_pins(env.root)
    if pins is None:
        raise PeerEnvError(f"The peer venv {env.root} is missing or unfinished: run `{SETUP_COMMAND}`.")
    if pins != PINS:
        raise PeerEnvError(f"The peer venv {env.root} has other pinned versions than this code: run `{SETUP_COMMAND}`.")
    if import_check:
        code = "import kvpress, transformers, torch; print(transformers.__version__, kvpress.__file__)"
        proc = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PeerEnvError(f"The peer venv {env.root} cannot import kvpress ({last}): run `{SETUP_COMMAND}`.")
    return env


def setup(root: Path | None = None, force: bool = False, log: object = print) -> tuple[PeerEnv, float]:
    """Build the peer venv (``python -m venv`` + pinned ``pip install``); returns it and the seconds it took.

    An existing finished venv with the same pins is kept unless ``force``.
    """
    env = PeerEnv(root or venv_dir())
    if not force and installed_pins(env.root) == PINS:
        return env, 0.0
    t0 = time.perf_counter()
    env.root.parent.mkdir(parents=True, exist_ok=True)
    if env.stamp.exists():
        env.stamp.unlink()
    log(f"Building the peer venv in {env.root} ({', '.join(requirements())}) ...")
    _run([sys.executable, "-m", "venv", "--clear", str(env.root)], "create the venv")
    pip = [str(env.python), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, *requirements()], "install the pinned packages")
    seconds = time.perf_counter() - t0
    env.stamp.write_text(json.dumps({"pins": PINS, "seconds": round(seconds, 1)}), encoding="utf-8")
    log(f"Peer venv ready in {seconds:.0f} s.")
    return env, seconds


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONNOUSERSITE": "1"})
    if proc.returncode != 0:
        raise PeerEnvError(f"Could not {what} for the peer venv (exit {proc.returncode}, see pip's output above).")


def setup_seconds(root: Path | None = None) -> float | None:
    """How long the recorded setup took, or None."""
    env = PeerEnv(root or venv_dir())
    try:
        return float(json.loads(env.stamp.read_text(encoding="utf-8"))["seconds"])
    except (OSError, ValueError, KeyError):
        return None
