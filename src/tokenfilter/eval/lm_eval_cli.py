"""``tokenfilter-lm-eval`` (or ``python -m tokenfilter.eval.lm_eval_cli``): lm-eval's own command line with the
``tokenfilter`` model type registered and the project's offline tasks (``tf_boolq`` ... ``tf_mmlu``) on its path.

    tokenfilter-lm-eval --model tokenfilter --model_args ratio=0.5 --tasks tf_boolq,tf_piqa --limit 20

lm-eval 0.4 has no plugin entry point for model types (its registry only knows modules that were imported), so
the plain ``lm_eval`` command cannot see ``--model tokenfilter``; this wrapper imports the model type first.
The project's task YAMLs also work with the plain command: ``lm_eval --include_path <tokenfilter/eval/tasks>``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import tokenfilter.eval.harness_model  # noqa: F401  (registers --model tokenfilter)
    from tokenfilter.eval.tasks import TASK_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    if "--tasks" in args and not any(a.startswith("--include_path") for a in args):
        args += ["--include_path", str(TASK_DIR)]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
