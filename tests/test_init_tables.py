"""Every row of model/init.py's tables, checked tensor by tensor against values and distributions written out here
from nanochat's `init_weights` and parameter golf's (PR #334) constructors -- nothing is read back from init.py.
The parity fixtures load their own parameters, so without this a wrong init row would pass every other test.

Distribution checks, on tensors of >= 64 draws: U(lo, hi) has every draw inside [lo, hi], reaches within 10% of
both ends, and has std (hi - lo)/sqrt(12) within 15%; N(0, std) has std within 10% (>= 2048 draws: 2% sampling
error), mean within 4 std/sqrt(n), and a draw beyond 2.5 std (a uniform of that std stops at 1.73 std)."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxchat.config import ModelConfig
from jaxchat.model.gpt import GPT, param_dict

C, L, V = 64, 3, 320


def params(**kw):
    base = dict(vocab_size=V, sequence_len=16, n_layer=L, n_embd=C, n_head=2, n_kv_head=2, smear_channels=64,
                ve_gate_channels=32)
    cfg = ModelConfig(**{**base, **kw})
    return jax.tree.map(lambda a: np.asarray(a, np.float64), param_dict(GPT(cfg, nnx.Rngs(params=7))))


def is_uniform(x, lo, hi):
    x = np.ravel(x)
    assert x.size >= 32 and x.min() >= lo and x.max() <= hi, (x.min(), x.max(), lo, hi)
    w = hi - lo
    assert x.min() < lo + 0.1 * w and x.max() > hi - 0.1 * w, (x.min(), x.max(), lo, hi)
    if x.size >= 1000:
        assert x.std() == pytest.approx(w / math.sqrt(12), rel=0.15)


def is_normal(x, std):
    x = np.ravel(x)
    assert x.size >= 2048
    assert x.std() == pytest.approx(std, rel=0.1) and abs(x.mean()) < 4 * std / math.sqrt(x.size)
    assert np.abs(x).max() > 2.5 * std


def is_truncated_normal(x, std):
    """JAX's xavier_normal: a normal truncated at +-2 sigma, sigma scaled up by 1/0.87962566 so the std is `std`."""
    x = np.ravel(x)
    assert x.size >= 2048 and x.std() == pytest.approx(std, rel=0.1)
    sigma = std / 0.87962566103423978
    assert 1.9 * sigma < np.abs(x).max() <= 2 * sigma + 1e-7


def is_const(x, value):
    np.testing.assert_array_equal(x, np.full(np.shape(x), value))


S = math.sqrt(3.0) / math.sqrt(C)  # nanochat: s = 3**0.5 * n_embd**-0.5


@pytest.fixture(scope="module")
def nano():
    return params()


def test_nanochat_embeddings_and_head(nano):
    is_normal(nano["wte"]["embedding"], 0.8)
    is_normal(nano["lm_head"]["kernel"], 0.001)
    assert set(nano["value_embeds"]) == {"0", "2"}  # alternating layers, the last one included (n_layer 3)
    for ve in nano["value_embeds"].values():
        is_uniform(ve["embedding"], -S, S)


def test_nanochat_blocks(nano):
    for i, b in nano["blocks"].items():
        for name in ("c_q", "c_k", "c_v"):
            is_uniform(b["attn"][name]["kernel"], -S, S)
        is_const(b["attn"]["c_proj"]["kernel"], 0.0)
        is_const(b["mlp"]["c_proj"]["kernel"], 0.0)
        is_uniform(b["mlp"]["c_fc"]["kernel"], -0.4 * S, 0.4 * S)
        if str(i) in nano["value_embeds"]:
            is_uniform(b["attn"]["ve_gate"]["kernel"], 0.0, 0.02)
        else:
            assert "ve_gate" not in b["attn"]


def test_nanochat_scalars(nano):
    # resid_lambdas[i] = 1.15 - 0.10 i / (L - 1), x0_lambdas[i] = 0.20 - 0.15 i / (L - 1), L = 3
    np.testing.assert_allclose(nano["resid_lambdas"], [1.15, 1.10, 1.05], rtol=1e-6)
    np.testing.assert_allclose(nano["x0_lambdas"], [0.20, 0.125, 0.05], rtol=1e-6)
    is_uniform(nano["smear_gate"]["kernel"], 0.0, 0.02)
    is_const(nano["smear_lambda"], 0.0)
    np.testing.assert_allclose(nano["backout_lambda"], [0.2], rtol=1e-6)


def test_yatnmn_rows_and_one_layer_lambdas():
    p = params(mlp="yatnmn_softplus", n_layer=1, yatnmn_eps=1e-3)
    fc = p["blocks"][0]["mlp"]["c_fc"]
    fan_in, fan_out = fc["kernel"].shape
    is_truncated_normal(fc["kernel"], math.sqrt(2.0 / (fan_in + fan_out)))  # xavier normal, fan_avg
    is_const(fc["bias"], 0.0)
    is_const(fc["alpha"], 1.0)
    # softplus(eps_raw) = eps: eps_raw = log(exp(1e-3) - 1) = -6.907255...
    np.testing.assert_allclose(fc["epsilon_param"], [-6.907255097429507], rtol=1e-6)
    assert np.log1p(np.exp(fc["epsilon_param"][0])) == pytest.approx(1e-3, rel=1e-5)
    # one layer: the lambdas' i / (L - 1) must not divide by zero
    np.testing.assert_allclose(p["resid_lambdas"], [1.15], rtol=1e-6)
    np.testing.assert_allclose(p["x0_lambdas"], [0.20], rtol=1e-6)


def test_golf_switch_rows():
    p = params(n_layer=4, smear=False, backout=False, value_embeds=False, residual_lambdas=False, q_gain=1.5,
               golf_block=True, unet=True, smear_v1=True, bigram_buckets=32, bigram_dim=32, bigram_scale=0.05,
               tie_embeddings=True, mlp="swiglu")
    assert "lm_head" not in p and "resid_lambdas" not in p and "smear_gate" not in p
    for b in p["blocks"].values():
        is_const(b["attn"]["q_gain"], 1.5)
        is_const(b["attn_scale"], 1.0)
        is_const(b["mlp_scale"], 1.0)
        is_uniform(b["mlp"]["c_fc"]["kernel"], -0.4 * S, 0.4 * S)
        is_uniform(b["mlp"]["c_gate"]["kernel"], -0.4 * S, 0.4 * S)
        is_const(b["mlp"]["c_proj"]["kernel"], 0.0)
    assert p["resid_mix"].shape == (4, 2, C)
    is_const(p["resid_mix"][:, 0], 1.0)  # row 0 weighs x
    is_const(p["resid_mix"][:, 1], 0.0)  # row 1 weighs x0
    is_const(p["skip_weights"], 1.0)
    is_const(p["smear_v1_gate"], 0.0)
    is_const(p["bigram"]["embed"], 0.0)
    # nanochat's table starts the projection as PR #334's final init (orthogonal / sqrt(2L), L = 4): a zero table
    # behind a zero projection gets zero gradients and never learns
    k = np.asarray(p["bigram"]["proj"]["kernel"], np.float64) * np.sqrt(2 * 4)
    m = k if k.shape[0] <= k.shape[1] else k.T
    np.testing.assert_allclose(m @ m.T, np.eye(m.shape[0]), atol=1e-5)
    np.testing.assert_allclose(p["bigram"]["scale"], 0.05, rtol=1e-6)


def test_golf_init():
    """PyTorch's Linear default U(-1/sqrt(in), 1/sqrt(in)) for every block input Linear, zeros for the output
    projections and an untied lm_head, wte ~ N(0, embed_init_std)."""
    p = params(init="golf", embed_init_std=0.5)
    is_normal(p["wte"]["embedding"], 0.5)
    is_const(p["lm_head"]["kernel"], 0.0)
    for b in p["blocks"].values():
        for name in ("c_q", "c_k", "c_v"):
            k = b["attn"][name]["kernel"]
            is_uniform(k, -1 / math.sqrt(k.shape[0]), 1 / math.sqrt(k.shape[0]))
        is_uniform(b["mlp"]["c_fc"]["kernel"], -1 / math.sqrt(C), 1 / math.sqrt(C))
        is_const(b["attn"]["c_proj"]["kernel"], 0.0)
        is_const(b["mlp"]["c_proj"]["kernel"], 0.0)
    # what golf does not replace keeps nanochat's row
    np.testing.assert_allclose(p["resid_lambdas"], [1.15, 1.10, 1.05], rtol=1e-6)


def orthogonal(k, scale=1.0):
    g = k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T
    np.testing.assert_allclose(g, scale**2 * np.eye(len(g)), atol=1e-5)


def test_golf_ortho_init():
    """Linears with min(shape) >= 64 are orthogonal; below 64 PyTorch's default; the bigram projection (64 -> 128,
    ortho) is scaled by 1/sqrt(2 L); the c_proj stay zero."""
    p = params(init="golf_ortho", n_layer=2, n_embd=128, n_head=2, n_kv_head=1, mlp="swiglu", bigram_buckets=16,
               bigram_dim=64)
    for b in p["blocks"].values():
        orthogonal(b["attn"]["c_q"]["kernel"])  # (128, 128)
        k = b["attn"]["c_k"]["kernel"]  # (128, 64): min 64, orthogonal
        assert k.shape == (128, 64)
        orthogonal(k)
        orthogonal(b["mlp"]["c_fc"]["kernel"])
        orthogonal(b["mlp"]["c_gate"]["kernel"])
        is_const(b["attn"]["c_proj"]["kernel"], 0.0)
        is_const(b["mlp"]["c_proj"]["kernel"], 0.0)
    orthogonal(p["bigram"]["proj"]["kernel"], 1 / math.sqrt(2 * 2))  # 1/sqrt(2 L), L = 2
    small = params(init="golf_ortho", n_layer=1, n_embd=64, n_head=2, n_kv_head=1, bigram_buckets=16,
                   bigram_dim=32)
    k = small["blocks"][0]["attn"]["c_k"]["kernel"]  # (64, 32): below 64, PyTorch's default
    is_uniform(k, -1 / 8, 1 / 8)
    is_const(small["bigram"]["proj"]["kernel"], 0.0)  # below 64 the bigram projection stays zero
