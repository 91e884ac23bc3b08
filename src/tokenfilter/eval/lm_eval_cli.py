"""``tokenfilter-lm-eval`` (or ``python -m tokenfilter.eval.lm_eval_cli``): lm-eval's own command line with the
``tokenfilter`` model type registered and the project's offline tasks (``tf_boolq`` ... ``tf_mmlu``) on its path.

    tokenfilter-lm-eval --model tokenfilter --model_args ratio=0.5 --tasks tf_boolq,tf_piqa --limit 20

lm-eval 0.4 has no plugin entry point for model types (its registry only knows modules that were imported), so
the plain ``lm_eval`` command cannot see ``--model tokenfilter``; this wrapper imports the model type first.
The project's task YAMLs also work with the plain command: ``lm_eval --include_path <tokenfilter/eval/tasks>``.

After lm-eval's table it prints one line with the realized pruning ratio and the FLOPs skipped, summed over every
forward of the run (and over every process when launched data-parallel):

    accelerate launch --num_processes 2 -m tokenfilter.eval.lm_eval_cli --model tokenfilter ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from tokenfilter.eval.harness_model import recording_instances  # (importing it registers --model tokenfilter)
    from tokenfilter.eval.tasks import TASK_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    if "--tasks" in args and not any(a.startswith("--include_path") for a in args):
        args += ["--include_path", str(TASK_DIR)]
    sys.argv = [sys.argv[0], *args]
    with recording_instances() as created:
        cli_evaluate()
        if created:  # a run of the tokenfilter model type (not e.g. --model hf, or --tasks list)
            lm = created[-1]
            stats = lm.gathered_filter_stats()  # every process takes part; the first one prints
            if lm.rank == 0:
                print(lm.stats_line(stats), flush=True)


if __name__ == "__main__":
    main()
