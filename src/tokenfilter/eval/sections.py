"""Named, regenerable sections of a Markdown results file.

``docs/results.md`` is written by several commands (``eval``, ``eval --tasks longctx``, ``study``); each owns
one section, delimited by HTML comments, and rewrites only that one::

    <!-- section:longctx -->
    ...
    <!-- /section:longctx -->
"""

from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r"<!-- section:(?P<name>[\w-]+) -->\n.*?<!-- /section:(?P=name) -->\n?", re.S)


def block(name: str, body: str) -> str:
    return f"<!-- section:{name} -->\n{body.rstrip()}\n<!-- /section:{name} -->\n"


def sections(text: str) -> dict[str, str]:
    """name -> the whole delimited block (markers included), in file order."""
    return {m.group("name"): m.group(0) for m in _BLOCK.finditer(text)}


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section ``name`` of ``path`` with ``body`` (appended when absent; the file is created if needed)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    new = block(name, body)
    old = sections(text).get(name)
    prefix = text.rstrip() + "\n\n" if text.strip() else ""
    text = prefix + new if old is None else text.replace(old, new)  # a new section goes at the end
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_keeping_sections(path: Path, main: str) -> None:
    """Write ``main`` as the file's body, keeping the sections other commands wrote there."""
    path = Path(path)
    kept = sections(path.read_text(encoding="utf-8")) if path.exists() else {}
    text = main.rstrip() + "\n"
    for blk in kept.values():
        text += "\n" + blk
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
