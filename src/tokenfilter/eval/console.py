"""A quiet console for the evaluation job: lm-eval, transformers and datasets log the same warnings once per
task and method, and lm-eval draws its own progress bars under ours. ``quiet_libraries`` silences both for
the duration of a run (and restores the settings after), so the console shows one progress bar and the table.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import warnings
from collections.abc import Iterator

from tqdm import tqdm

LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub", "accelerate", "evaluate")
# modules that draw progress bars of their own: lm-eval's task building, tokenizing and loglikelihood requests,
# transformers' GGUF de-quantization (which ignores its progress-bar switch)
_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface", "lm_eval.evaluator",
                "transformers.modeling_gguf_pytorch_utils")
_NOISY = r"(lm_eval|transformers|datasets|huggingface_hub|accelerate|evaluate)(\..*)?$"


def _silent(bar_class: type) -> object:
    """A stand-in for ``bar_class`` (a tqdm class) that iterates as usual and draws nothing."""

    def silent_tqdm(*args: object, **kwargs: object) -> tqdm:
        kwargs["disable"] = True
        return bar_class(*args, **kwargs)

    return silent_tqdm


@contextlib.contextmanager
def _loggers_at_error() -> Iterator[None]:
    before = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _no_library_bars() -> Iterator[None]:
    patched = []
    for name in _BAR_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        bar_class = getattr(module, "tqdm", None)
        if isinstance(bar_class, type) and issubclass(bar_class, tqdm):
            patched.append((module, bar_class))
            module.tqdm = _silent(bar_class)
    try:
        yield
    finally:
        for module, bar_class in patched:
            module.tqdm = bar_class


def _library_verbosity_error() -> None:
    """transformers' and datasets' own verbosity switches (they log through handlers of their own)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence lm-eval's, transformers' and datasets' log warnings, Python warnings and progress bars."""
    _library_verbosity_error()
    with warnings.catch_warnings(), _loggers_at_error(), _no_library_bars():
        warnings.filterwarnings("ignore", module=_NOISY)
        yield
