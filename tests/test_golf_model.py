"""The parameter-golf and marin switches (docs/architecture.md §Golf): each changes the output when on and nothing
when at its neutral value; causality and KV-cache decoding with every switch on; golf's init schemes; bad values;
the golf presets' parameter counts."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.config import ConfigError, ModelConfig
from jaxchat.model.accounting import count
from jaxchat.model.embeddings import bigram_hash
from jaxchat.model.gpt import GPT, param_dict
from jaxchat.presets import get_preset

# nanochat's features stay on (smear, backout, value embeddings, lambdas, SSSL windows) so the switches are
# exercised together with them; sequence_len 512 gives windows of 128, and tests use 160 tokens.
BASE = ModelConfig(vocab_size=320, sequence_len=512, n_layer=4, n_embd=64, n_head=4, n_kv_head=2)
SWITCHES = dict(rope_dims=8, qk_norm_before_rope=True, q_gain=1.5, attn_scale_mult=1.35, ln_scale=True,
                smear_v1=True, bigram_buckets=37, bigram_dim=16, unet=True, golf_block=True, mlp_mult=3,
                mlp="leaky_relu2")
ALL = replace(BASE, **SWITCHES)
OFF = dict(rope_dims=0, qk_norm_before_rope=False, q_gain=0.0, attn_scale_mult=1.0, ln_scale=False, smear_v1=False,
           bigram_buckets=0, unet=False, golf_block=False, mlp="relu2")


def randomized_params(cfg: ModelConfig, seed=0) -> dict:
    """GPT(cfg)'s parameters, each moved off its init (zero-init and neutral ones included)."""
    params = param_dict(GPT(cfg, nnx.Rngs(seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def build(cfg: ModelConfig, params: dict) -> GPT:
    """GPT(cfg) with its parameters taken from `params` (which may hold more: a config's switches turned off)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg)))

    def pick(shapes, src):
        return {k: pick(v, src[k]) if isinstance(v, dict) else src[k] for k, v in shapes.items()}

    return nnx.merge(graphdef, pick(nnx.to_pure_dict(abstract), params))


@pytest.fixture(scope="module")
def all_params():
    return randomized_params(ALL)


@pytest.fixture(scope="module")
def idx():
    return jnp.asarray(np.random.default_rng(0).integers(0, BASE.vocab_size, (2, 160)))


@pytest.fixture(scope="module")
def full(all_params, idx):
    return np.asarray(build(ALL, all_params)(idx))


def neutral(params: dict, switch: str) -> dict:
    """The parameters with `switch`'s own tensors at the values that make it the identity."""
    p = jax.tree.map(lambda x: x, params)
    if switch == "q_gain":
        for b in p["blocks"].values():
            b["attn"]["q_gain"] = jnp.ones_like(b["attn"]["q_gain"])
    elif switch == "golf_block":
        p["resid_mix"] = jnp.stack([jnp.ones_like(p["resid_mix"][:, 0]), jnp.zeros_like(p["resid_mix"][:, 1])], 1)
        for b in p["blocks"].values():
            b["attn_scale"], b["mlp_scale"] = jnp.ones_like(b["attn_scale"]), jnp.ones_like(b["mlp_scale"])
    elif switch == "unet":
        p["skip_weights"] = jnp.zeros_like(p["skip_weights"])
    elif switch == "smear_v1":
        p["smear_v1_gate"] = jnp.full_like(p["smear_v1_gate"], -jnp.inf)  # g = 0
    elif switch == "bigram_buckets":
        p["bigram"]["scale"] = jnp.zeros_like(p["bigram"]["scale"])
    return p


@pytest.mark.parametrize("switch", ["q_gain", "golf_block", "unet", "smear_v1", "bigram_buckets"])
def test_switch_with_parameters_changes_output_and_is_nothing_at_neutral(switch, all_params, idx, full):
    """With every other switch on: turning this one off changes the logits; at its neutral values (gain 1, mix
    (1, 0) and scales 1, skip weights 0, gate sigmoid 0, bigram scale 0) the model equals it off, bitwise."""
    off_cfg = replace(ALL, **{switch: OFF[switch]})
    off = np.asarray(build(off_cfg, all_params)(idx))
    assert np.abs(full - off).max() > 1e-3
    at_neutral = np.asarray(build(ALL, neutral(all_params, switch))(idx))
    np.testing.assert_array_equal(at_neutral, off)


@pytest.mark.parametrize("switch", ["attn_scale_mult", "ln_scale", "mlp", "rope_dims"])
def test_switch_without_parameters_changes_output(switch, all_params, idx, full):
    off = np.asarray(build(replace(ALL, **{switch: OFF[switch]}), all_params)(idx))
    assert np.abs(full - off).max() > 1e-3


def test_rope_dims_equal_to_head_dim_is_full_rope(idx):
    """rope_dims = head_dim is the full rotation, bitwise (the same code path as rope_dims 0)."""
    params = randomized_params(BASE)
    a = np.asarray(build(BASE, params)(idx))
    b = np.asarray(build(replace(BASE, rope_dims=BASE.head_dim), params)(idx))
    np.testing.assert_array_equal(a, b)


def test_qk_norm_before_rope_is_the_same_function_rounded_differently(all_params, idx, full):
    """A rotation keeps the norm, so golf's order (norm, RoPE) and nanochat's (RoPE, norm) agree to fp32 rounding,
    partial RoPE included."""
    other = np.asarray(build(replace(ALL, qk_norm_before_rope=False), all_params)(idx))
    np.testing.assert_allclose(other, full, atol=1e-5, rtol=1e-5)


def test_mlp_mult_sets_the_hidden_width():
    for mult in (2, 3, 4):
        p = count(replace(BASE, value_embeds=False, mlp_mult=mult)).params
        assert p["mlp"] == BASE.n_layer * 2 * BASE.n_embd * mult * BASE.n_embd


def assert_causal(model, idx, vocab_size: int, t: int = 150) -> None:
    """d logits[t] / d wte[s] is zero for every token that occurs only after t, nonzero for t and t-1 (the smears
    and the bigram reach back one token); and changing every token after t leaves logits[:t+1] unchanged."""
    graphdef, params = nnx.split(model)

    @jax.jit
    @jax.grad
    def grad_wrt_embedding(emb):
        p = jax.tree.map(lambda x: x, params)
        p["wte"]["embedding"] = emb
        return nnx.merge(graphdef, p)(idx[:1])[0, t].sum()

    g = np.abs(np.asarray(grad_wrt_embedding(model.wte.embedding[...]))).sum(-1)
    past = set(np.asarray(idx[0, : t + 1]).tolist())
    future = [int(s) for s in np.asarray(idx[0, t + 1:]) if int(s) not in past]
    assert future and all(g[s] == 0.0 for s in future)
    assert g[int(idx[0, t])] > 0 and g[int(idx[0, t - 1])] > 0
    changed = idx.at[:, t + 1:].set((idx[:, t + 1:] + 7) % vocab_size)
    a, b = np.asarray(model(idx)), np.asarray(model(changed))
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-3


def test_causality_with_every_switch_on(all_params, idx):
    """Causal by gradient and by changing the future, with every golf switch on (assert_causal)."""
    assert_causal(build(ALL, all_params), idx, BASE.vocab_size)


def test_decode_equals_full_forward_with_every_switch_on(all_params, idx, full):
    """Prefill + one token at a time, with BigramHash, SmearGate v1 and nanochat's smear (and every other switch)
    on, reproduces the full forward; the cache's previous token and embedding are both needed."""
    model = build(ALL, all_params)
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, i, c: nnx.merge(graphdef, p)(i, cache=c))
    cache = model.init_cache(2, 160)
    logits, cache = run(params, idx[:, :37], cache)
    outs = [logits]
    for t in range(37, 160):
        if t == 37:
            no_tok, _ = run(params, idx[:, t:t + 1], {**cache, "prev_tok": jnp.zeros_like(cache["prev_tok"])})
            no_x, _ = run(params, idx[:, t:t + 1], {**cache, "prev_x": jnp.zeros_like(cache["prev_x"])})
        logits, cache = run(params, idx[:, t:t + 1], cache)
        if t == 37:
            assert np.abs(np.asarray(no_tok - logits)).max() > 1e-4
            assert np.abs(np.asarray(no_x - logits)).max() > 1e-4
        outs.append(logits)
    assert np.abs(full).max() > 0.1
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5, rtol=1e-5)


def test_bigram_hash_is_golfs():
    idx = jnp.asarray([[5, 300, 7, 0, 1023]])
    h = np.asarray(bigram_hash(idx, jnp.zeros((1,), jnp.int32), jnp.arange(5), 2048))
    expected = [0] + [(36313 * int(idx[0, t]) + 27191 * int(idx[0, t - 1])) % 2048 for t in range(1, 5)]
    assert h[0].tolist() == expected
    big = jnp.asarray([[32767, 32766]])  # the int64 reference value, from int32 arithmetic
    assert int(bigram_hash(big, jnp.zeros((1,), jnp.int32), jnp.arange(2), 32768)[0, 1]) == \
        (36313 * 32766 + 27191 * 32767) % 32768


def _orthogonal(k):
    k = np.asarray(k, np.float64)
    gram = k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T
    return np.abs(gram - np.eye(gram.shape[0])).max() < 1e-4


@pytest.mark.slow  # (~10 s: OrthoInit at a size where it applies)
def test_ortho_init_rules():
    """golf_ortho: min(shape) >= 64 -> orthogonal; the BigramHash proj then x 1/sqrt(2L); output projections and
    the bigram table zero; a Linear below 64 keeps PyTorch's default U(-1/sqrt(in), 1/sqrt(in)), except the bigram
    proj, which stays zero; tied wte ~ N(0, embed_init_std)."""
    cfg = ModelConfig(vocab_size=512, sequence_len=64, n_layer=3, n_embd=128, n_head=4, n_kv_head=1,
                      tie_embeddings=True, embed_init_std=0.005, bigram_buckets=40, bigram_dim=64, init="golf_ortho",
                      smear=False, backout=False, value_embeds=False, residual_lambdas=False, golf_block=True,
                      q_gain=1.5, unet=True, smear_v1=True)
    m = GPT(cfg, nnx.Rngs(0))
    b = m.blocks[0]
    for k in (b.attn.c_q.kernel, b.attn.c_k.kernel, b.mlp.c_fc.kernel):  # c_k: 128 x 32 keeps the default
        k = np.asarray(k[...])
        if min(k.shape) >= 64:
            assert _orthogonal(k)
        else:
            assert not _orthogonal(k) and np.abs(k).max() <= 1 / np.sqrt(k.shape[0])
    assert min(b.attn.c_k.kernel.shape) < 64 <= min(b.attn.c_q.kernel.shape)
    proj = np.asarray(m.bigram.proj.kernel[...]) * np.sqrt(2 * cfg.n_layer)
    assert _orthogonal(proj)
    for z in (b.attn.c_proj.kernel, b.mlp.c_proj.kernel, m.bigram.embed, m.smear_v1_gate):
        assert not np.asarray(z[...]).any()
    assert abs(float(np.asarray(m.wte.embedding[...])[:512].std()) - 0.005) < 5e-4
    assert float(m.bigram.scale[...]) == pytest.approx(0.05)
    assert np.all(np.asarray(b.attn.q_gain[...]) == 1.5) and np.all(np.asarray(m.skip_weights[...]) == 1)
    assert np.all(np.asarray(m.resid_mix[...])[:, 0] == 1) and not np.asarray(m.resid_mix[...])[:, 1].any()
    small = GPT(replace(cfg, bigram_dim=16), nnx.Rngs(0))
    assert not np.asarray(small.bigram.proj.kernel[...]).any()
    plain = GPT(replace(cfg, init="golf"), nnx.Rngs(0))  # the baseline: PyTorch's default everywhere
    k = np.asarray(plain.blocks[0].attn.c_q.kernel[...])
    assert not _orthogonal(k) and np.abs(k).max() <= 1 / np.sqrt(k.shape[0])


@pytest.mark.parametrize("kw,name", [
    (dict(rope_dims=7), "rope_dims=7"),
    (dict(rope_dims=BASE.head_dim + 2), f"rope_dims={BASE.head_dim + 2}"),
    (dict(unet=True, n_layer=1), "n_layer=1"),
    (dict(bigram_buckets=16, bigram_dim=0), "bigram_dim=0"),
    (dict(bigram_buckets=-1), "bigram_buckets=-1"),
    (dict(unet=True, scan_layers=True), "scan_layers"),
    (dict(ln_scale=True, scan_layers=True), "scan_layers"),
    (dict(mlp="swiglu", mlp_mult=3), "mlp_mult=3"),
    (dict(init="ortho"), "init='ortho'"),
    (dict(rope_dims=8, rope_norm="pallas"), "rope_norm=pallas"),
])
def test_bad_values_name_themselves(kw, name):
    with pytest.raises(ConfigError, match=name.replace("(", r"\(").replace(")", r"\)")):
        replace(BASE, **kw)


@pytest.mark.parametrize("name,expected", [("golf-baseline", 17_059_912), ("golf-pr334", 26_666_073)])
def test_golf_preset_parameter_counts(name, expected):
    assert count(get_preset(name).model).params["total"] == expected
