"""The parameter-golf pipeline (docs/golf.md, docs/golf-eval.md): sliding-window evaluation (sliding.py),
test-time training (ttt.py), export quantisation (quant.py), the compressed artifact and its byte accounting
(artifact.py, export.py), the submission folder (submission.py) and their CLI (commands.py)."""
