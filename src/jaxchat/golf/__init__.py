"""The parameter-golf pipeline (docs/golf-eval.md): sliding-window evaluation, test-time training."""
