"""A real jaxchat GPT whose next-token logits are set by hand, for the downstream-eval tests (test_evals_*.py).

With every block's output projections at zero, the blocks add nothing, so the logits at a position depend only on
that position's token: x = norm(wte[token]), logits = norm(x) @ lm_head. Each token in `table` gets its own
one-hot embedding direction d (all other tokens share direction 0), and lm_head row d holds the logits wanted
after that token (divided by norm's scale sqrt(C)). So the model is a chosen bigram table, and its answers are
known before it runs. Features that would mix tokens (smear, value embeddings, backout, residual lambdas) are off.
"""

from __future__ import annotations

import argparse

import numpy as np

from jaxchat.data.tokenizer import Tokenizer
from jaxchat.interop.common import ImportReport, write_run
from jaxchat.overrides import apply_overrides
from jaxchat.presets import get_preset
from jaxchat.train import ModelFns

VOCAB = 512
SETTINGS = ["model.n_layer=1", "model.smear=false", "model.backout=false", "model.value_embeds=false",
            "model.residual_lambdas=false", "model.logit_softcap=0", "model.window_pattern=L",
            f"model.vocab_size={VOCAB}", f"data.tokenizer_vocab={VOCAB}", "model.n_embd=64", "model.n_head=1",
            "model.n_kv_head=1", "model.sequence_len=128"]
# a small corpus, so training the tokenizer takes a moment and "####", " the", " dog", " cat" become single tokens
CORPUS = ["the answer is #### 12\n" * 400, "3*4 = 12, 5*6 = 30\n" * 50,
          "the dog and the cat saw the bird. A B C D 1 2 3 4\n" * 100, open(argparse.__file__).read()[:5000]]


def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, VOCAB)


def config():
    return apply_overrides(get_preset("tiny"), SETTINGS)


def bigram_params(cfg, table: dict[int, dict[int, float]], default: dict[int, float]) -> dict:
    """Params whose logits after token t are table[t] (missing ids 0), after any other token `default`."""
    fns = ModelFns(cfg)
    params = fns.init_params(0)
    C, V = cfg.model.n_embd, cfg.model.vocab_size
    assert len(table) < C
    block = params["blocks"][0]
    block["attn"]["c_proj"]["kernel"] = np.zeros_like(block["attn"]["c_proj"]["kernel"])
    block["mlp"]["c_proj"]["kernel"] = np.zeros_like(block["mlp"]["c_proj"]["kernel"])
    wte = np.zeros((params["wte"]["embedding"].shape), np.float32)
    head = np.zeros(params["lm_head"]["kernel"].shape, np.float32)
    wte[:, 0] = 1.0
    for v, logit in default.items():
        head[0, v] = logit / np.sqrt(C)
    for d, (t, row) in enumerate(table.items(), start=1):
        wte[t] = 0.0
        wte[t, d] = 1.0
        for v, logit in row.items():
            head[d, v] = logit / np.sqrt(C)
    params["wte"]["embedding"] = wte
    params["lm_head"]["kernel"] = head
    assert head.shape[1] >= V
    return fns, params


def write_bigram_run(path, tok, table, default):
    """A real run directory (config, tokenizer, Orbax checkpoint) of the bigram model."""
    cfg = config()
    _, params = bigram_params(cfg, table, default)
    write_run(path, cfg.model, params, None, 1, tok, ImportReport("test bigram"), log=lambda *a: None)
    return path
