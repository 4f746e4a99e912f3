"""The model: `gpt.py` (GPT, Block, Attention and the init table), `mlp.py` (MLP registry),
`attention.py` (attention backends), `accounting.py` (parameter and FLOP counts, MFU)."""

from jaxchat.model.gpt import GPT, cross_entropy, token_nll

__all__ = ["GPT", "cross_entropy", "token_nll"]
