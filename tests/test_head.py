"""The fused training head (model/head.py) computes exactly token_nll(softcap(x @ W)) and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.config import ModelConfig
from jaxchat.model.gpt import GPT, token_nll
from jaxchat.model.head import head_nll


def reference(x, w, targets, cap):
    z = jnp.matmul(x, w).astype(jnp.float32)
    s = cap * jnp.tanh(z / cap) if cap > 0 else z
    return token_nll(s, targets)


@pytest.mark.parametrize("cap", [15.0, 0.0])
def test_fused_head_matches_autodiff_fp32(cap):
    kx, kw, kt, kg = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (2, 8, 16))
    w = 2.0 * jax.random.normal(kw, (16, 40))
    targets = jax.random.randint(kt, (2, 8), 0, 40).at[0, 3].set(-1)  # one ignored position
    g = jax.random.normal(kg, (2, 8))
    ref, ref_vjp = jax.vjp(lambda x, w: reference(x, w, targets, cap), x, w)
    out, out_vjp = jax.vjp(lambda x, w: head_nll(x, w, targets, cap), x, w)
    assert float(jnp.abs(ref).max()) > 1.0 and float(out[0, 3]) == 0.0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(out_vjp(g), ref_vjp(g)):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_model_targets_path_equals_logits_path():
    cfg = ModelConfig(vocab_size=60, sequence_len=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, pad_vocab_to=64)
    model = GPT(cfg)
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, 60)
    targets = jnp.roll(idx, -1, axis=1).at[:, -1].set(-1)
    np.testing.assert_allclose(np.asarray(model(idx, targets=targets)), np.asarray(token_nll(model(idx), targets)),
                               rtol=1e-5, atol=1e-6)


def test_fused_head_bf16_matches_autodiff_of_bf16_logits():
    """bf16 compute: the same function as autodiff through nanochat's bf16 logits (cast to fp32 after the matmul)."""
    kx, kw, kt, kg = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(kx, (4, 32, 64)).astype(jnp.bfloat16)
    w = (0.3 * jax.random.normal(kw, (64, 256))).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (4, 32), 0, 256)
    g = jax.random.normal(kg, (4, 32))
    ref, ref_vjp = jax.vjp(lambda x, w: reference(x, w, targets, 15.0), x, w)
    out, out_vjp = jax.vjp(lambda x, w: head_nll(x, w, targets, 15.0), x, w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
    for a, b in zip(out_vjp(g), ref_vjp(g)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2
