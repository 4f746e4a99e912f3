"""Model invariants: causality, sliding windows, KV-cache decoding, parameter counts, every preset and MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxchat.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxchat.model.accounting import count
from jaxchat.model.attention import window_mask
from jaxchat.model.gpt import GPT, param_dict
from jaxchat.model.mlp import MLPS, swiglu_hidden
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


def test_sliding_window_limits_receptive_field():
    """With one short-window layer only, position t cannot see position t - w - 1."""
    # two S layers: the last is forced long, so the first one is tested alone
    cfg = ModelConfig(vocab_size=320, sequence_len=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=4,
                      window_pattern="S", value_embeds=False, smear=False)
    w = cfg.window_sizes()[0]
    assert w == 128
    m = randomized(cfg)
    h = jax.random.normal(jax.random.PRNGKey(0), (1, 200, 64))
    attn = m.blocks[0].attn
    pos = jnp.arange(200)

    def out(h):
        return attn(h, None, pos)[0][0, 199].sum()

    g = np.abs(np.asarray(jax.grad(out)(h)))[0].sum(-1)
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


def test_smear_uses_previous_token_at_decode_time(model, run):
    """Dropping the cache's previous-token embedding changes the decode output, so the cache carries it."""
    idx = jnp.asarray([[5, 9, 17, 33]])
    cache = model.init_cache(1, 4)
    _, cache = run(idx[:, :3], cache)
    good, _ = run(idx[:, 3:], cache)
    bad, _ = run(idx[:, 3:], {**cache, "prev_x": jnp.zeros_like(cache["prev_x"])})
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


@pytest.mark.parametrize("mlp", sorted(MLPS))
def test_every_mlp_trains(mlp):
    cfg = Config(model=ModelConfig(vocab_size=320, sequence_len=32, n_layer=2, n_embd=64, n_head=2, n_kv_head=2,
                                   mlp=mlp),
                 optim=OptimConfig(lr=1e-2, warmup_steps=2), data=DataConfig(tokenizer_vocab=320),
                 train=TrainConfig(num_steps=12, batch_size=4))
    fns = ModelFns(cfg)
    from jaxchat.optim import build_optimizer
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
