"""marin's switches (speedrun PR #2184) and XSA (docs/architecture.md §Marin): partial RoPE as zero frequency slots
with Llama's rotate_half against a float64 numpy reference, XSA against golf's formula in numpy, the backout
layer, marin's init, each switch changing the output, causality and decoding with every switch on, the marin
presets' parameter counts, Levanter's FLOPs per token and the 2.5 tokens-per-parameter horizon."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.config import ConfigError, ModelConfig
from jaxchat.model.accounting import count, levanter_flops, run_flops
from jaxchat.model.gpt import GPT, exclusive, param_dict
from jaxchat.model.rotary import rope_norm_xla, rope_tables
from jaxchat.plan import resolve
from jaxchat.presets import get_preset
from test_golf_model import ALL as GOLF_ALL, assert_causal, build, randomized_params

# Every golf switch and every marin one together (rope_partial replaces golf's first-dims form here).
MARIN = dict(rope_dims=8, rope_partial="zero_freqs", rope_rotate_half=True, backout_layer=1, xsa_layers=2,
             attn_scale_mult=1.35, init="marin")
ALL = replace(GOLF_ALL, **MARIN)


def llama_partial_rope_f64(x, theta, rotated):
    """Levanter/HF Llama RoPE in float64 with marin's partial form: D/2 frequency slots, the first rotated/2 of
    them 1 / theta^(2j/rotated), the rest 0; emb = cat(freqs, freqs); x * cos + rotate_half(x) * sin with
    rotate_half(x) = cat(-x2, x1). x (B, T, N, D)."""
    D = x.shape[-1]
    j = np.arange(D // 2)
    inv = np.where(j < rotated // 2, 1.0 / theta ** (2.0 * j / rotated), 0.0)
    ang = np.arange(x.shape[1])[:, None] * inv[None, :]
    emb = np.concatenate([ang, ang], -1)[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * np.cos(emb) + np.concatenate([-x2, x1], -1) * np.sin(emb)


def test_marin_partial_rope_is_llamas_with_zero_frequency_slots():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 50, 3, 128))
    cos, sin = rope_tables(jnp.arange(50), 128, 1024.0, zero_from=32, rotate_half=True)
    got = np.asarray(rope_norm_xla(jnp.asarray(x, jnp.float32), cos, sin, eps=1e-6, scale=1.0))
    r = llama_partial_rope_f64(x, 1024.0, 64)
    ref = r / np.sqrt(np.mean(r * r, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    # half the dims pass through: slots 32..63 and 96..127 are the (normed) input
    xn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got[..., 32:64], xn[..., 32:64], atol=2e-5, rtol=1e-4)
    assert np.abs(got[..., 1:32] - xn[..., 1:32]).max() > 0.1
    # nanochat's direction is the other one: it differs from Llama's
    cos2, sin2 = rope_tables(jnp.arange(50), 128, 1024.0, zero_from=32)
    other = np.asarray(rope_norm_xla(jnp.asarray(x, jnp.float32), cos2, sin2, eps=1e-6, scale=1.0))
    assert np.abs(other - got).max() > 0.1


def xsa_f64(y, v):
    """Golf's XSA in float64: per kv group, y - (y . v/|v|) v/|v| with torch's F.normalize (eps 1e-12)."""
    B, T, H, D = y.shape
    K = v.shape[2]
    yg = y.reshape(B, T, K, H // K, D)
    vn = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    vn = vn[:, :, :, None, :]
    return (yg - (yg * vn).sum(-1, keepdims=True) * vn).reshape(B, T, H, D)


def test_xsa_is_golfs_projection_and_orthogonal_to_the_own_value():
    rng = np.random.default_rng(1)
    y, v = rng.standard_normal((2, 9, 6, 16)), rng.standard_normal((2, 9, 2, 16))
    got = np.asarray(exclusive(jnp.asarray(y, jnp.float32), jnp.asarray(v, jnp.float32)))
    np.testing.assert_allclose(got, xsa_f64(y, v), atol=1e-5, rtol=1e-5)
    # query heads 0..2 share kv head 0, heads 3..5 kv head 1: the outputs are orthogonal to their own value
    dots = np.einsum("btkgd,btkd->btkg", got.reshape(2, 9, 2, 3, 16), v)
    assert np.abs(dots).max() < 1e-4 and np.abs(got - y).max() > 0.1


@pytest.fixture(scope="module")
def all_params():
    return randomized_params(ALL)


@pytest.fixture(scope="module")
def idx():
    return jnp.asarray(np.random.default_rng(0).integers(0, ALL.vocab_size, (2, 160)))


@pytest.fixture(scope="module")
def full(all_params, idx):
    return np.asarray(build(ALL, all_params)(idx))


@pytest.mark.parametrize("switch,off", [("rope_partial", "first_dims"), ("rope_rotate_half", False),
                                        ("backout_layer", -1), ("xsa_layers", 0), ("xsa_layers", 1)])
def test_marin_switch_changes_output(switch, off, all_params, idx, full):
    other = np.asarray(build(replace(ALL, **{switch: off}), all_params)(idx))
    assert np.abs(full - other).max() > 1e-3


def test_backout_layer_minus_one_is_nanochats_middle(idx):
    base = replace(GOLF_ALL, unet=False)
    params = randomized_params(base)
    a = np.asarray(build(base, params)(idx))
    b = np.asarray(build(replace(base, backout_layer=base.n_layer // 2), params)(idx))
    np.testing.assert_array_equal(a, b)


def test_causality_with_every_switch_on(all_params, idx):
    """Causal by gradient and by changing the future, with every golf and marin switch on (assert_causal)."""
    assert_causal(build(ALL, all_params), idx, ALL.vocab_size)


def test_decode_equals_full_forward_with_every_switch_on(all_params, idx, full):
    """Prefill then one token at a time, with XSA, marin's RoPE and backout, BigramHash and both smears on."""
    model = build(ALL, all_params)
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, i, c: nnx.merge(graphdef, p)(i, cache=c))
    cache = model.init_cache(2, 160)
    logits, cache = run(params, idx[:, :41], cache)
    outs = [logits]
    for t in range(41, 160):
        logits, cache = run(params, idx[:, t:t + 1], cache)
        outs.append(logits)
    assert np.abs(full).max() > 0.1
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5, rtol=1e-5)


def test_marin_init():
    cfg = ModelConfig(vocab_size=320, sequence_len=64, n_layer=3, n_embd=64, n_head=2, n_kv_head=2, init="marin")
    p = param_dict(GPT(cfg, nnx.Rngs(0)))
    assert np.all(np.asarray(p["lm_head"]["kernel"]) == 0)
    for b in p["blocks"].values():
        assert np.all(np.asarray(b["attn"]["c_proj"]["kernel"]) == 0)
        assert np.all(np.asarray(b["mlp"]["c_proj"]["kernel"]) == 0)
        assert np.asarray(b["attn"]["c_q"]["kernel"]).std() > 0.01
    np.testing.assert_array_equal(np.asarray(p["resid_lambdas"]), np.full(3, 1.1, np.float32))
    np.testing.assert_array_equal(np.asarray(p["x0_lambdas"]), np.zeros(3, np.float32))
    np.testing.assert_array_equal(np.asarray(p["backout_lambda"]), np.full(1, 0.5, np.float32))


@pytest.mark.parametrize("kw,name", [(dict(rope_partial="halves"), "model.rope_partial"),
                                     (dict(backout_layer=4), "model.backout_layer"),
                                     (dict(xsa_layers=5), "model.xsa_layers"),
                                     (dict(xsa_layers=1, scan_layers=True), "model.xsa_layers"),
                                     (dict(init="levanter"), "model.init")])
def test_bad_values_name_themselves(kw, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        ModelConfig(vocab_size=320, sequence_len=64, n_layer=4, n_embd=64, n_head=2, n_kv_head=2, **kw)


# (n_layer, C): params = 2 * V * C (embed + untied head) + L * 12 C^2 (attention 4 C^2 with K = H, MLP 8 C^2)
# + 2L + 1 scalars (resid and x0 lambdas, backout), V = 128,256.
@pytest.mark.parametrize("name,L,C", [("marin-150m", 6, 512), ("marin-270m", 11, 768), ("marin-460m", 16, 1024)])
def test_marin_preset_parameter_counts(name, L, C):
    expected = 2 * 128256 * C + L * 12 * C * C + 2 * L + 1
    assert count(get_preset(name).model).params["total"] == expected
    assert expected > 1.4e8


def test_levanter_flops_per_token_marin_150m():
    """The numbers of SPEC_SPEEDRUN §5 (Levanter's lm_flops_per_token for the 150m model)."""
    f = levanter_flops(get_preset("marin-150m").model)
    assert (f["lm_head"], f["mlp"], f["attention"], f["total"]) == (131334144, 25165824, 37896192, 194396160)
    g = levanter_flops(get_preset("marin-270m").model)  # the PR's (197M, 104M, 122M) = 422M
    assert (round(g["lm_head"] / 1e6), round(g["mlp"] / 1e6), round(g["attention"] / 1e6)) == (197, 104, 122)


def test_tokens_per_param_horizon_and_run_flops_match_the_pr():
    """2.5 tokens per parameter over all 150,208,525 parameters at 192 x 2048 tokens a step: 955 steps; the run's
    model FLOPs 3 x 194,396,160 x tokens = 2.19e17, the PR's figure."""
    r = resolve(get_preset("marin-150m"))
    assert r.train.num_steps == int(2.5 * 150208525) // (192 * 2048) == 955
    tokens = r.train.num_steps * 192 * 2048
    rf = run_flops(r.model, tokens, step_seconds=1000.0, chips=1, peak=989.5e12)
    assert round(rf["levanter_model_flops"] / 1e15) == 219
    assert rf["hardware_flops"] == 1000.0 * 989.5e12
    assert rf["run_mfu"] == pytest.approx(rf["levanter_model_flops"] / 9.895e17)


def test_params_command_prints_marin_counts_and_levanter_flops(capsys):
    from jaxchat.cli import main

    assert main(["params", "--preset", "marin-150m"]) == 0
    out = capsys.readouterr().out
    assert "marin-150m: 150,208,525 parameters" in out
    assert ("194,396,160 = lm_head 131,334,144 + mlp 25,165,824 + attention 37,896,192") in out


def test_marin_rope_forms_are_nothing_when_every_dim_rotates(idx):
    """rope_partial=zero_freqs with rope_dims 0 or head_dim is the full rotation, bitwise (no slot is zero)."""
    base = replace(GOLF_ALL, rope_dims=0)
    params = randomized_params(base)
    a = np.asarray(build(base, params)(idx))
    for dims in (0, base.head_dim):
        b = np.asarray(build(replace(base, rope_dims=dims, rope_partial="zero_freqs"), params)(idx))
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # (~8 s: trains a few steps)
def test_bigram_hash_learns_under_nanochats_init(idx):
    """A zero table behind a zero projection would get zero gradients (and the projection too): under the nanochat
    table the projection starts orthogonal / sqrt(2L), so the first gradient reaches the table."""
    cfg = replace(ModelConfig(vocab_size=320, sequence_len=512, n_layer=2, n_embd=64, n_head=2, n_kv_head=2),
                  bigram_buckets=37, bigram_dim=16)
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(0)))
    assert np.all(np.asarray(params["bigram"]["embed"][...]) == 0)
    grad = jax.grad(lambda p: nnx.merge(graphdef, p)(idx[:, :-1], targets=idx[:, 1:]).mean())
    assert np.abs(np.asarray(grad(params)["bigram"]["embed"][...])).max() > 0
    dead = jax.tree.map(lambda x: x, params)
    dead["bigram"]["proj"]["kernel"] = jnp.zeros_like(dead["bigram"]["proj"]["kernel"][...])
    g = grad(dead)  # the old init: nothing reaches either
    assert not np.any(np.asarray(g["bigram"]["embed"][...]))
    assert not np.any(np.asarray(g["bigram"]["proj"]["kernel"][...]))
