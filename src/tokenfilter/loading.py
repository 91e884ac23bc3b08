"""Loading models: a built-in model by short name (the default SmolLM2-135M-Instruct, qwen2.5-coder-1.5b or
gemma3-270m; ``builtin_models``), a local Hugging Face folder, a ``.gguf`` file, or a hub id (where online)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tokenfilter.builtin_models import BUILTIN, DEFAULT, ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_NAME", "ModelLoadError", "default_model_file", "display_name", "load_model", "model_source"]

DEFAULT_NAME = BUILTIN[DEFAULT].name


def default_model_file() -> Path:
    """The default model's GGUF file (``ModelLoadError`` naming the install command when it is missing)."""
    return BUILTIN[DEFAULT].path()


def display_name(spec: str | None) -> str:
    """What reports call the model: a built-in model's full name, else what the user gave."""
    if spec is None:
        return DEFAULT_NAME
    model = BUILTIN.get(spec.lower())
    return model.name if model is not None else spec


def _dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ModelLoadError(f"Unknown dtype {name!r}; use float32, bfloat16 or float16.")
    return table[name]


HUB_PROBE_TIMEOUT = 1.5  # seconds: how long the connectivity probe waits for the hub
_TRUE = {"1", "true", "yes", "on"}


def _probe_address() -> tuple[str, int]:
    """Where the hub is reached: the proxy for its scheme when one is set, else the hub (``HF_ENDPOINT``)."""
    hub = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    names = ("HTTPS_PROXY", "https_proxy") if hub.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[n] for n in (*names, "ALL_PROXY", "all_proxy") if os.environ.get(n)), None)
    url = hub if not proxy else urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``, or the proxy in front of it) opens
    within ``timeout`` seconds.

    Runs in a daemon thread so that a slow name look-up cannot hold the caller past ``timeout``."""
    host, port = _probe_address()
    done, opened = threading.Event(), []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    done.wait(timeout)
    return bool(opened)


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used (``HF_HUB_OFFLINE`` set, or no connection), or None when it answers."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    if not hub_reachable():
        host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
        return f"could not connect to {host} within {HUB_PROBE_TIMEOUT:g} s"
    return None


def _in_hub_cache(repo_id: str, cache_dir: str | Path | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
        raise ModelLoadError(
            f"{repo_id!r} is neither an existing path nor a valid hub id; check the value given to --model."
        ) from None
    return isinstance(found, str)


def _unreachable(spec: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load {spec!r}: it is not a local path, it is not in the Hugging Face cache, and the hub is "
        f"unreachable ({reason}); give a local model folder or .gguf file to --model, or go online."
    )


def model_source(spec: str | None = None, cache_dir: str | Path | None = None) -> tuple[str, dict]:
    """Where ``spec`` loads from, without importing torch: ``(folder or hub id, from_pretrained kwargs)``.

    Raises ``ModelLoadError`` (one sentence with the fix) for a missing path, a folder without config.json, or
    a hub id that is neither in the local cache nor reachable (checked in about 1.5 s, with no retries)."""
    if spec is None:
        spec = DEFAULT
    if spec.lower() in BUILTIN:
        path = BUILTIN[spec.lower()].path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"Model file {path} does not exist; check the path given to --model.")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} has no config.json; give a Hugging Face model folder, a .gguf file or a hub id."
            )
        return str(path), {}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"Model path {spec} does not exist; check the path given to --model.")
    kwargs: dict = {"cache_dir": str(cache_dir)} if cache_dir else {}
    if _in_hub_cache(spec, cache_dir):
        return spec, {**kwargs, "local_files_only": True}
    reason = hub_offline_reason()
    if reason:
        raise _unreachable(spec, reason)
    return spec, kwargs


def load_model(spec: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu",
               cache_dir: str | Path | None = None):
    """Return ``(model, tokenizer)`` in eval mode. ``spec``: None (the default model), a built-in model's short
    name (``smollm2-135m``, ``qwen2.5-coder-1.5b``, ``gemma3-270m``), a folder, a .gguf file or a hub id (from the
    local Hugging Face cache first, then the hub where it is reachable)."""
    torch_dtype = _dtype(dtype)
    folder, kwargs = model_source(spec, cache_dir)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok, model = _from_pretrained(folder, torch_dtype, kwargs)
    except OSError as exc:
        if not kwargs.get("local_files_only"):
            raise ModelLoadError(
                f"Could not load {spec!r}: it is not a local model and the hub is not reachable ({exc})."
            ) from None
        reason = hub_offline_reason()  # the cache holds only part of the model: fetch the rest if we can
        if reason:
            raise _unreachable(spec, reason) from None
        tok, model = _from_pretrained(folder, torch_dtype, {k: v for k, v in kwargs.items() if k != "local_files_only"})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def _from_pretrained(folder: str, torch_dtype: torch.dtype, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    return tok, model
