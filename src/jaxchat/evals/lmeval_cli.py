"""`jaxchat-lm-eval ARGS`: lm_eval's own command line (the same ARGS as `lm_eval`) with the jaxchat model registered
first, for lm_eval releases that do not discover models through entry points (harness.py)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        import jaxchat.evals.harness  # noqa: F401  (registers --model jaxchat)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        sys.exit(f"jaxchat-lm-eval: {e}")
    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
