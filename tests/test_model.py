"""Model invariants: causality, sliding windows, KV-cache decoding, parameter counts, every preset and MLP."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # JAX's own account of what a backward keeps (private API)

from jaxchat.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxchat.model.accounting import count
from jaxchat.model.attention import window_mask
from jaxchat.model.gpt import GPT, param_dict
from jaxchat.model.mlp import MLPS, gelu_tanh, relu_squared, swiglu_hidden
from jaxchat.model.rotary import positions
from jaxchat.optim import build_optimizer
from jaxchat.presets import PRESETS, get_preset
from jaxchat.train import ModelFns, init_state, make_train_step, shaped_batch

# sequence_len 512 gives short windows of 128; tests use 160 tokens so the sliding window is really exercised.
SMALL = ModelConfig(vocab_size=320, sequence_len=512, n_layer=4, n_embd=64, n_head=4, n_kv_head=2)


def randomized(cfg: ModelConfig, seed=0) -> GPT:
    """A model whose every tensor is moved off its init (zero-init projections and lambdas included)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(cfg)))

    @jax.jit
    def make():
        params = param_dict(GPT(cfg, nnx.Rngs(seed)))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    return nnx.merge(graphdef, make())


@pytest.fixture(scope="module")
def model():
    return randomized(SMALL)


@pytest.fixture(scope="module")
def run(model):
    """The model's forward, jitted once: run(idx) or run(idx, cache)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, idx, cache=None):
        return nnx.merge(graphdef, params)(idx, cache=cache)

    return lambda idx, cache=None: forward(params, idx, cache)


def test_window_sizes():
    assert ModelConfig(sequence_len=2048, n_layer=12).window_sizes() == (512, 512, 512, 2048) * 3
    assert ModelConfig(sequence_len=512, n_layer=4).window_sizes() == (128, 128, 128, 512)
    assert ModelConfig(sequence_len=512, n_layer=3).window_sizes() == (128, 128, 512)  # last layer forced long


def test_window_mask_counts_w_plus_one_keys():
    m = np.asarray(window_mask(jnp.arange(10), jnp.arange(10), window=3))
    assert m.sum(1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert not m[5, 6] and m[5, 2] and not m[5, 1]


def test_causality_by_gradient(model):
    """d logits[t] / d embedding[s] is zero for every s > t, and nonzero for s <= t within the window."""
    idx = jnp.asarray(np.random.default_rng(0).integers(0, SMALL.vocab_size, (1, 160)))
    t = 150

    graphdef, params = nnx.split(model)

    @jax.jit
    @jax.grad
    def grad_wrt_embedding(emb):
        p = jax.tree.map(lambda x: x, params)
        p["wte"]["embedding"] = emb
        return nnx.merge(graphdef, p)(idx)[0, t].sum()

    g = grad_wrt_embedding(model.wte.embedding[...])
    per_pos = np.array([float(jnp.abs(g[int(i)]).sum()) for i in idx[0]])  # token ids are distinct enough
    future = [s for s in range(t + 1, 160) if int(idx[0, s]) not in set(np.asarray(idx[0, : t + 1]).tolist())]
    assert future, "need future tokens that do not also occur in the past"
    assert all(per_pos[s] == 0.0 for s in future)
    assert per_pos[t] > 0 and per_pos[t - 1] > 0


def test_sliding_window_limits_receptive_field(model):
    """With one short-window layer alone (the model's first: window 128 of sequence_len 512, 4 query heads on 2
    kv heads), position t cannot see position t - w - 1."""
    w = SMALL.window_sizes()[0]
    assert w == 128 and SMALL.window_sizes()[-1] == 512
    graphdef, params = nnx.split(model.blocks[0].attn)
    p = positions(0, 200, SMALL.head_dim, SMALL.rope_base)

    @jax.jit
    @jax.grad
    def grad(h):
        return nnx.merge(graphdef, params)(h, None, p)[0][0, 199].sum()

    h = jax.random.normal(jax.random.PRNGKey(0), (1, 200, 64))
    g = np.abs(np.asarray(grad(h)))[0].sum(-1)
    assert g[199 - w] > 0 and g[199 - w - 1] == 0 and g[:199 - w].sum() == 0


def test_kv_cache_decoding_equals_full_forward(model, run):
    """Prefill + one token at a time (windows and smear active) reproduces the full forward."""
    idx = jnp.asarray(np.random.default_rng(1).integers(0, SMALL.vocab_size, (2, 160)))
    full = np.asarray(run(idx))
    assert np.abs(full).max() > 0.1
    cache = model.init_cache(2, 160)
    logits, cache = run(idx[:, :37], cache)
    outs = [logits]
    for t in range(37, 160):
        logits, cache = run(idx[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5, rtol=1e-5)


def test_training_forward_takes_the_rope_tables_as_constants(model):
    """Training and evaluation positions are 0..T-1, known at trace time, so the rotary cos/sin tables are computed
    once while tracing and enter the program as constants, one pair shared by every layer. Computed in the graph,
    XLA:CPU fused the (T, D/2) cos and sin into each consumer and evaluated them again for every batch row and
    head: ~70 ms of a cpu-bench step. Decoding positions start at the cache cursor, a traced value, so there the
    tables stay in the graph."""
    graphdef, params = nnx.split(model)
    idx = jnp.zeros((2, 160), jnp.int32)
    train = jax.jit(lambda p, i: nnx.merge(graphdef, p)(i)).lower(params, idx).as_text()
    assert "stablehlo.cosine" not in train and "stablehlo.sine" not in train
    tables = [line for line in train.splitlines() if re.search(r"stablehlo.constant dense<.*tensor<160x8xf32>", line)]
    assert len(tables) == 2, tables  # cos and sin once for all 4 layers, not a copy per layer (12 MB at d12)
    decode = jax.jit(lambda p, i, c: nnx.merge(graphdef, p)(i, cache=c)).lower(params, idx, model.init_cache(2, 200))
    assert "stablehlo.cosine" in decode.as_text() and "stablehlo.sine" in decode.as_text()


def test_smear_uses_previous_token_at_decode_time(model, run):
    """Dropping the cache's previous-token embedding changes the decode output, so the cache carries it. (Shapes
    as in the test above: batch 2, a 160-slot cache, a 37-token prefill, then one token; compiled once.)"""
    idx = jnp.asarray(np.random.default_rng(2).integers(0, SMALL.vocab_size, (2, 38)))
    cache = model.init_cache(2, 160)
    _, cache = run(idx[:, :37], cache)
    good, _ = run(idx[:, 37:], cache)
    bad, _ = run(idx[:, 37:], {**cache, "prev_x": jnp.zeros_like(cache["prev_x"])})
    assert np.abs(np.asarray(good - bad)).max() > 1e-4


@pytest.mark.parametrize("name,expected", [("nanochat-d12", 286_261_730), ("d12-gelu-chinchilla", 261_096_338)])
def test_parameter_counts(name, expected):
    c = count(get_preset(name).model)
    assert c.params["total"] == expected


def test_nanochat_d12_parameter_split():
    p = count(get_preset("nanochat-d12").model).params
    assert (p["embed"], p["value_embeds"], p["lm_head"], p["attention"], p["mlp"], p["ve_gates"], p["scalars"]) == \
        (25_165_824, 150_994_944, 25_165_824, 28_311_552, 56_623_104, 432, 50)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_abstractly(name):
    cfg = get_preset(name)
    abstract = nnx.eval_shape(lambda: GPT(cfg.model))
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n == count(cfg.model).params["total"] > 1_000_000


def test_swiglu_matches_relu2_parameter_budget():
    assert swiglu_hidden(768) == 2048
    a = count(ModelConfig(mlp="swiglu")).params["mlp"]
    b = count(ModelConfig(mlp="relu2")).params["mlp"]
    assert a == b


def test_every_mlp_alone_reaches_every_parameter_and_fits():
    """Each MLP kind on its own (width 32, random weights): the gradient reaches every one of its parameters (gate,
    YatNMN bias, alpha and learnable eps included) and 40 Adam steps fit a fixed random target (the loss falls
    below a fifth). Compiles in well under a second per kind; the whole model trains with each kind below."""
    C = 32
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x, y = jax.random.normal(kx, (64, C)), jax.random.normal(ky, (64, C))
    tx = optax.adam(1e-2)
    for kind in sorted(MLPS):
        graphdef, params = nnx.split(MLPS[kind](C, ModelConfig()))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        params = jax.tree.unflatten(tree, [jax.random.normal(k, p.shape) / np.sqrt(p.shape[0]) if p.ndim == 2
                                           else 0.5 + 0.1 * jax.random.normal(k, p.shape)
                                           for p, k in zip(leaves, keys)])

        @jax.jit
        def step(p, opt_state):
            loss, g = jax.value_and_grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2))(p)
            u, opt_state = tx.update(g, opt_state, p)
            return optax.apply_updates(p, u), opt_state, loss, g

        opt_state, losses = tx.init(params), []
        for i in range(40):
            params, opt_state, loss, g = step(params, opt_state)
            if i == 0:
                dead = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(g)
                        if not np.abs(np.asarray(v)).max() > 0]
                assert len(jax.tree.leaves(g)) >= 2 and not dead, (kind, dead)
            losses.append(float(loss))
        assert np.isfinite(losses).all() and losses[-1] < 0.2 * losses[0], (kind, losses)


# Every MLP kind trains inside the whole model; relu2 (the default) and yatnmn_softplus (the most involved: a
# learned distance in the denominator, softplus bias, learnable eps) in the fast suite, the others under -m slow
# (gelu also trains inside an imported model in test_interop, and each kind alone above).
FAST_MLPS = ("relu2", "yatnmn_softplus")


@pytest.mark.parametrize("mlp", [m if m in FAST_MLPS else pytest.param(m, marks=pytest.mark.slow)
                                 for m in sorted(MLPS)])
def test_every_mlp_trains(mlp):
    cfg = Config(model=ModelConfig(vocab_size=320, sequence_len=32, n_layer=2, n_embd=64, n_head=2, n_kv_head=2,
                                   mlp=mlp),
                 optim=OptimConfig(lr=1e-2, warmup_steps=2), data=DataConfig(tokenizer_vocab=320),
                 train=TrainConfig(num_steps=12, batch_size=4))
    fns = ModelFns(cfg)
    opt = build_optimizer(cfg, None)
    state = init_state(fns, opt, 0)
    step = make_train_step(fns, opt)
    x = np.random.default_rng(0).integers(0, 320, (4, 33)).astype(np.int32)
    batch = shaped_batch(x[:, :-1], x[:, 1:], 1)
    losses = []
    for _ in range(12):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses


def test_gelu_backward_keeps_only_its_input_and_is_the_exact_derivative():
    """gelu_tanh is jax.nn.gelu forward for forward (bitwise, fp32 and bf16); its hand-written backward equals the
    float64 derivative of jax.nn.gelu to fp32 rounding and, under bf16, is closer to it than autodiff's chain of
    bf16 roundings; and it saves one (tokens, 4C) tensor for the backward, where autodiff saves five."""
    x64 = np.linspace(-6.0, 6.0, 4001)
    with jax.enable_x64():
        exact = np.asarray(jax.grad(lambda x: jnp.sum(jax.nn.gelu(x)))(jnp.asarray(x64, jnp.float64)))
    grad = lambda f, x: np.asarray(jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32)))(x), np.float64)
    x32, xb = jnp.asarray(x64, jnp.float32), jnp.asarray(x64, jnp.bfloat16)
    for x in (x32, xb):
        np.testing.assert_array_equal(np.asarray(gelu_tanh(x), np.float32), np.asarray(jax.nn.gelu(x), np.float32))
    assert np.abs(exact).max() > 1.0 and exact.min() < -0.1  # the real slope: above 1 and negative in places
    assert np.abs(grad(gelu_tanh, x32) - exact).max() < 1e-5
    with jax.enable_x64():  # the bf16 inputs' own exact slopes (x rounded to bf16 first)
        exact_b = np.asarray(jax.grad(lambda x: jnp.sum(jax.nn.gelu(x)))(jnp.asarray(xb, jnp.float64)))
    err_custom = np.abs(grad(gelu_tanh, xb) - exact_b).max()
    err_autodiff = np.abs(grad(jax.nn.gelu, xb) - exact_b).max()
    assert err_custom <= 2 ** -8 and err_custom < err_autodiff / 2, (err_custom, err_autodiff)

    big = lambda f: [r for r in saved_residuals(lambda x: jnp.sum(f(x).astype(jnp.float32)), xb) if r[0].shape]
    assert len(big(gelu_tanh)) == 1 and len(big(jax.nn.gelu)) >= 3


def test_relu_squared_is_autodiffs_bf16_bit_for_bit():
    """The bf16 relu^2 the CPU path uses (its roundings by cpu_dots.rounded) gives autodiff's bits, forward and
    backward, over values on both sides of 0 (the backward's two branches) and large enough to round."""
    h = jnp.asarray(np.random.default_rng(0).standard_normal((64, 256)) * 30, jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((64, 256)), jnp.bfloat16)
    ref = lambda h: jnp.square(jax.nn.relu(h))
    bits = lambda a: np.asarray(a).view(np.uint16)
    for f in (lambda fn: fn, jax.jit):
        y, vjp = jax.vjp(f(relu_squared), h)
        y_ref, vjp_ref = jax.vjp(f(ref), h)
        assert y.dtype == jnp.bfloat16 and np.array_equal(bits(y), bits(y_ref))
        assert np.array_equal(bits(vjp(g)[0]), bits(vjp_ref(g)[0]))
    assert (np.asarray(h) < 0).any() and np.abs(np.asarray(y_ref, np.float32)).max() > 1000


@pytest.mark.parametrize("by_hand", [False, True])
def test_gelu_mlp_backward_follows_the_device_choice(monkeypatch, by_hand):
    """GeluMLP differentiates through gelu_tanh where `gelu_backward_by_hand()` says so (accelerators) and through
    autodiff of jax.nn.gelu elsewhere (CPU); both give the same fp32 gradients."""
    monkeypatch.setattr("jaxchat.model.mlp.gelu_backward_by_hand", lambda: by_hand)
    cfg = ModelConfig(vocab_size=64, sequence_len=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, mlp="gelu")
    model = GPT(cfg)
    idx = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(idx, targets=jnp.roll(idx, -1, 1)))
    calls = re.findall(r"custom_vjp_call\[\s*name=(\w+)", str(jax.make_jaxpr(loss)(params)))
    assert calls.count("gelu_tanh") == (cfg.n_layer if by_hand else 0) and calls.count("head_nll") == 1, calls
    grads = jax.jit(jax.grad(loss))(params)
    monkeypatch.setattr("jaxchat.model.mlp.gelu_backward_by_hand", lambda: not by_hand)
    other = jax.jit(jax.grad(loss))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(grads)) > 1e-2


def test_peak_flops_table_is_the_vendors():
    """bf16 dense peak FLOP/s per device, written out from the vendors' data sheets (NVIDIA H100/H200 SXM 989.5 T,
    A100 312 T; Google Cloud TPU v6e 918 T, v5p 459 T, v5e 197 T, v4 275 T): MFU divides by these."""
    from jaxchat.model.accounting import PEAK_FLOPS

    assert PEAK_FLOPS == {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12, "TPU v6e": 918e12,
                          "TPU v6 lite": 918e12, "TPU v5p": 459e12, "TPU v5e": 197e12, "TPU v5 lite": 197e12,
                          "TPU v4": 275e12}


def test_nanochat_d12_flops_per_token_by_hand():
    """nanochat's estimate_flops (karpathy/nanochat@92d63d4 gpt.py): 6 x matmul weights + 12 H D min(w, T) per
    layer. d12: lm_head 25,165,824 + attention 28,311,552 + MLP 56,623,104 + ve gates 432 + smear gate 24 =
    110,100,936 weights; windows SSSL at T 2048: nine of 512, three of 2048 (10,752 positions) x 12 x 6 x 128."""
    f = count(get_preset("nanochat-d12").model).flops
    assert f["lm_head"] == 6 * 25_165_824 and f["mlp"] == 6 * 56_623_104 and f["gates"] == 6 * 456
    assert f["attention"] == 6 * 28_311_552 + 12 * 6 * 128 * 10_752
    assert f["total"] == 6 * 110_100_936 + 99_090_432 == 759_696_048


def test_bigram_projection_counts_as_a_matmul_its_table_does_not():
    """BigramHash: the (bigram_dim, C) projection is a matmul (6 FLOPs per weight), the bucket table a lookup."""
    cfg = ModelConfig(vocab_size=320, sequence_len=64, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, smear=False,
                      value_embeds=False, bigram_buckets=32, bigram_dim=16)
    assert count(cfg).flops["gates"] == 6 * 16 * 64


def test_mfu_by_hand():
    from jaxchat.model.accounting import mfu

    assert mfu(759_696_048, 10_000, 989.5e12, 8) == pytest.approx(759_696_048 * 10_000 / (8 * 989.5e12))  # 0.096%
    assert mfu(1e9, 1e3, 1e12) == pytest.approx(1.0)
    assert mfu(1e9, 1e3, None) is None and mfu(1e9, 1e3, 0.0) is None  # no known peak (CPU): no MFU
