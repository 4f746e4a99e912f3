"""Downstream evaluation of a run's checkpoint: nanochat's CORE (core.py), nanochat's chat evals (chat_tasks.py,
chat_eval.py), and a model for EleutherAI's lm-evaluation-harness (harness.py), all on jaxchat's own forward
(scoring.py) and decode engine (chat/engine.py). `jaxchat eval --core/--chat` lives in commands.py."""
