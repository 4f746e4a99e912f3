"""Exactness against the reference implementations' own outputs (tests/fixtures)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from jaxchat.config import Config, DataConfig
from jaxchat.interop.common import InteropError
from jaxchat.interop.golf import model_from_state_dict as golf_model_from_state_dict
from jaxchat.interop.nanochat import config_from_nanochat, model_from_state_dict
from jaxchat.model.gpt import cross_entropy, param_dict
from jaxchat.model.init import assign
from jaxchat.model.mlp import YatNMN
from jaxchat.sample import Sampler
from jaxchat.train import ModelFns


@pytest.fixture(scope="module")
def nanochat():
    d = np.load(fixture_path("nanochat_tiny.npz"))
    state = {k.removeprefix("param/"): d[k] for k in d.files if k.startswith("param/")}
    model = model_from_state_dict(state, str(d["config"]))
    return d, state, model


def test_nanochat_logits(nanochat):
    d, _, model = nanochat
    ref = d["logits"]
    assert np.abs(ref).max() > 1.0  # a real signal, not a trivial zero
    out = np.asarray(model(jnp.asarray(d["idx"])))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4


def test_nanochat_loss(nanochat):
    d, _, model = nanochat
    assert (d["targets"] == -1).any() and (d["targets"] >= 0).any()  # the ignore index is exercised
    loss = float(cross_entropy(model(jnp.asarray(d["idx"])), jnp.asarray(d["targets"])))
    assert float(d["loss"]) > 1.0
    assert abs(loss - float(d["loss"])) <= 1e-5


def test_nanochat_greedy(nanochat):
    d, _, model = nanochat
    cfg = Config(model=model.config, data=DataConfig(tokenizer_vocab=model.config.vocab_size))
    params = param_dict(model)
    out = Sampler(ModelFns(cfg)).generate(params, [int(t) for t in d["prompt"]], len(d["greedy"]), temperature=0)
    assert len(set(out)) > 1
    assert out == [int(t) for t in d["greedy"]]


def test_nanochat_greedy_logits_at_every_step(nanochat):
    """Tokens alone cannot see a decode bug that moves the logits but not their argmax (a cache off by a little):
    the logits of every step of the Sampler's own prefill + cached decode are compared with the full forward over
    prompt + the fixture's greedy reply (that forward is nanochat's to 1e-4, test_nanochat_logits), and the greedy
    token is their argmax by a margin."""
    d, _, model = nanochat
    cfg = Config(model=model.config, data=DataConfig(tokenizer_vocab=model.config.vocab_size))
    params = param_dict(model)
    sampler = Sampler(ModelFns(cfg))
    prompt, greedy = [int(t) for t in d["prompt"]], [int(t) for t in d["greedy"]]
    full = np.asarray(model(jnp.asarray([prompt + greedy])))[0, len(prompt) - 1:-1]  # (24, V): step j's logits
    cache = model.init_cache(1, len(prompt) + len(greedy))
    logits, cache = sampler.forward(params, jnp.asarray([prompt], jnp.int32), cache)
    steps = [np.asarray(logits)[0, -1]]
    for t in greedy[:-1]:
        logits, cache = sampler.forward(params, jnp.asarray([[t]], jnp.int32), cache)
        steps.append(np.asarray(logits)[0, -1])
    steps = np.stack(steps)
    assert np.abs(np.diff(full, axis=0)).max() > 0.1  # the logits move from step to step
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-4)
    assert steps.argmax(-1).tolist() == greedy


def test_every_fixture_tensor_is_used_and_changes_output(nanochat):
    """Perturbing any single tensor must move the logits: no parameter is silently ignored. (The input is the
    fixture's whole idx, 2 x 256 tokens, past the short window of 128: the forward's ops at this shape are
    compiled once for test_nanochat_logits already.)"""
    d, state, model = nanochat
    idx = jnp.asarray(d["idx"])
    base = np.asarray(model(idx))
    for name in sorted(state):
        bumped = dict(state)
        bumped[name] = state[name] + 0.05
        out = np.asarray(model_from_state_dict(bumped, str(d["config"]))(idx))
        assert np.abs(out - base).max() > 1e-6, name


def test_wrong_config_is_refused(nanochat):
    d, state, _ = nanochat
    cfg = json.loads(str(d["config"]))
    with pytest.raises(InteropError, match="n_layer=3"):
        model_from_state_dict(state, {**cfg, "n_layer": 3})
    with pytest.raises(InteropError, match="shape of"):
        model_from_state_dict(state, {**cfg, "n_kv_head": 4})


def test_nanochat_default_eps_is_fp32_machine_epsilon():
    assert config_from_nanochat({"n_layer": 2, "n_embd": 128, "n_head": 2, "n_kv_head": 2}).norm_eps == \
        float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("variant", ["plain", "softplus"])
def test_yatnmn_matches_nmn(variant):
    d = np.load(fixture_path("yatnmn.npz"))
    layer = YatNMN(64, 256, eps=1e-3, softplus=variant == "softplus")
    assign(layer.kernel, jnp.asarray(d[f"{variant}/param/kernel"]))
    assign(layer.bias, jnp.asarray(d[f"{variant}/param/bias"]))
    assign(layer.alpha, jnp.asarray(d[f"{variant}/param/alpha"]))
    if variant == "softplus":
        assign(layer.epsilon_param, jnp.asarray(d["softplus/param/epsilon_param"]))
    ref = d[f"{variant}/y"]
    assert np.abs(ref).max() > 0.1
    out = np.asarray(layer(jnp.asarray(d["x"])))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def golf():
    d = np.load(fixture_path("golf_pr334_tiny.npz"))
    state = {k.removeprefix("param/"): d[k] for k in d.files if k.startswith("param/")}
    return d, state, golf_model_from_state_dict(state, str(d["config"]))


def test_golf_pr334_logits_and_loss(golf):
    """PR #334's own model (U-Net golf blocks, BigramHash, SmearGate v1, partial RoPE, q_gain, LN scale, tied,
    softcap 30): logits within 1e-4 and the loss within 1e-5 of the reference's, in fp32."""
    d, _, model = golf
    ref = d["logits"]
    assert np.abs(ref).max() > 1.0
    out = np.asarray(model(jnp.asarray(d["idx"])))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4
    loss = float(cross_entropy(jnp.asarray(out), jnp.asarray(d["targets"])))
    assert float(d["loss"]) > 1.0
    assert abs(loss - float(d["loss"])) <= 1e-5


def test_every_golf_fixture_tensor_is_used_and_changes_output(golf):
    """Perturbing any single reference tensor moves the logits: none is silently ignored."""
    d, state, model = golf
    idx = jnp.asarray(d["idx"])
    base = np.asarray(model(idx))
    for name in sorted(state):
        bumped = dict(state)
        bumped[name] = state[name] + 0.05 * np.random.default_rng(0).standard_normal(state[name].shape)
        out = np.asarray(golf_model_from_state_dict(bumped, str(d["config"]))(idx))
        assert np.abs(out - base).max() > 1e-6, name


def test_golf_state_dict_mismatch_names_the_tensor(golf):
    d, state, _ = golf
    broken = {k: v for k, v in state.items() if k != "blocks.1.attn.q_gain"}
    with pytest.raises(InteropError, match="q_gain"):
        golf_model_from_state_dict(broken, str(d["config"]))
