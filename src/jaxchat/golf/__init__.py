"""The parameter-golf pipeline (docs/golf.md): export quantisation (quant.py), the compressed artifact and its
byte accounting (artifact.py), the submission folder (submission.py) and their CLI (commands.py)."""
