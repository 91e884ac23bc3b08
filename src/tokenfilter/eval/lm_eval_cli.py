"""``tokenfilter-lm-eval``: lm-eval's own command line with the ``tokenfilter`` model type registered."""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import tokenfilter.eval.harness_model  # noqa: F401  (registers --model tokenfilter)

    cli_evaluate()


if __name__ == "__main__":
    main()
