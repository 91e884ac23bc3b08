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
# lm-eval modules that draw progress bars (task building, tokenizing, loglikelihood requests)
_LM_EVAL_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface", "lm_eval.evaluator")
_NOISY = r"(lm_eval|transformers|datasets|huggingface_hub|accelerate|evaluate)(\..*)?$"


def silent_tqdm(*args: object, **kwargs: object) -> tqdm:
    """A tqdm that iterates as usual and draws nothing."""
    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


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
def _no_lm_eval_bars() -> Iterator[None]:
    patched = []
    for name in _LM_EVAL_BAR_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "tqdm", None) is tqdm:
            patched.append(module)
            module.tqdm = silent_tqdm
    try:
        yield
    finally:
        for module in patched:
            module.tqdm = tqdm


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
    with warnings.catch_warnings(), _loggers_at_error(), _no_lm_eval_bars():
        warnings.filterwarnings("ignore", module=_NOISY)
        yield
