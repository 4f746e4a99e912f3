"""The fused training head (model/head.py) computes exactly token_nll(softcap(x @ W)) and its gradients, whole or
in chunks of tokens (model.loss_chunk)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.config import Config, ConfigError, DataConfig, ModelConfig
from jaxchat.overrides import apply_overrides
from jaxchat.model.gpt import GPT, token_nll
from jaxchat.model import head
from jaxchat.model.head import head_nll, resolve_chunk
from jaxchat.train import ModelFns


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


def assert_close_nontrivial(a, b, rtol, atol, floor=1e-3):
    """a == b within tolerance, and b is not (near) all zero, so the comparison means something."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(b).max() > floor
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("cap", [15.0, 0.0])
@pytest.mark.parametrize("chunk", [16, 20, 100])  # N = 48 tokens: divides N, pads the last chunk, larger than N
def test_chunked_head_matches_unchunked_and_autodiff_fp32(cap, chunk):
    kx, kw, kt, kg = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (3, 16, 24))
    w = 2.0 * jax.random.normal(kw, (24, 40))
    targets = jax.random.randint(kt, (3, 16), 0, 40).at[0, 3].set(-1).at[2, 15].set(-1)  # first and last chunk
    g = jax.random.normal(kg, (3, 16))
    ref, ref_vjp = jax.vjp(lambda x, w: reference(x, w, targets, cap), x, w)
    whole, whole_vjp = jax.vjp(lambda x, w: head_nll(x, w, targets, cap, 0), x, w)
    out, out_vjp = jax.vjp(lambda x, w: head_nll(x, w, targets, cap, chunk), x, w)
    assert out.shape == targets.shape and float(out[0, 3]) == 0.0 and float(out[2, 15]) == 0.0
    assert_close_nontrivial(out, whole, rtol=1e-6, atol=1e-6, floor=1.0)
    assert_close_nontrivial(out, ref, rtol=1e-5, atol=1e-5, floor=1.0)
    for a, b, r in zip(out_vjp(g), whole_vjp(g), ref_vjp(g)):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert_close_nontrivial(a, b, rtol=1e-5, atol=1e-5)
        assert_close_nontrivial(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot lowering")
def test_chunked_head_dw_is_canonical_in_fp32():
    """No fp32 dot of the chunked head contracts the lhs's dim 0: each chunk's dW reads x_c^T copied row-major
    (cpu_dots.transposed(copy_f32=True)); folded into the dot, it runs on XLA:CPU's slower Eigen path."""
    x, w, targets = jnp.ones((2, 16, 24)), jnp.ones((24, 40)), jnp.zeros((2, 16), jnp.int32)
    for loss in (jnp.sum, lambda nll: jnp.sum(nll * jnp.arange(16.0))):  # forward-made and recomputed grads
        grad = jax.jit(jax.grad(lambda x, w: loss(head_nll(x, w, targets, 15.0, 8)), argnums=(0, 1)))
        dims = re.findall(r"lhs_contracting_dims=\{(\d)\}, rhs_contracting_dims=\{(\d)\}",
                          grad.lower(x, w).compile().as_text())
        assert len(dims) >= 3 and all(lhs == "1" for lhs, _ in dims), dims


@pytest.mark.parametrize("loss", ["sum", "mean", "scaled_sum"])
def test_chunked_head_uses_forward_gradients_for_uniform_cotangents(loss, monkeypatch):
    """A summed or mean loss gives every counted token the same cotangent: the backward then only scales the
    gradients the forward formed. Proved by making the recompute branch return NaN: the gradients stay finite
    and equal autodiff's. A cotangent that differs between counted tokens must take the recompute branch (NaN
    here), even when only an ignored token's cotangent is what makes the rest look uniform."""
    kx, kw, kt = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (3, 16, 24))
    w = 2.0 * jax.random.normal(kw, (24, 40))
    targets = jax.random.randint(kt, (3, 16), 0, 40).at[0, 3].set(-1).at[2, 15].set(-1)
    reduce = {"sum": jnp.sum, "mean": lambda nll: jnp.sum(nll) / jnp.sum(targets >= 0),
              "scaled_sum": lambda nll: 0.37 * jnp.sum(nll)}[loss]
    real_recompute = head._recompute_grads
    monkeypatch.setattr(head, "_recompute_grads",
                        lambda x, w, *a: (jnp.full(x.shape, jnp.nan, x.dtype), jnp.full(w.shape, jnp.nan, w.dtype)))
    grad = lambda f: jax.grad(lambda x, w: reduce(f(x, w)), argnums=(0, 1))(x, w)
    out = grad(lambda x, w: head_nll(x, w, targets, 15.0, 20))
    ref = grad(lambda x, w: reference(x, w, targets, 15.0))
    for a, r in zip(out, ref):
        assert_close_nontrivial(a, r, rtol=1e-4, atol=1e-5)
    weights = jnp.ones((3, 16)).at[1, 4].set(2.0)  # a weighted loss: one counted token counts twice
    ignored_only = jnp.ones((3, 16)).at[0, 3].set(5.0)  # differs only on an ignored token: still uniform
    weighted = lambda v: jax.grad(lambda x, w: jnp.sum(v * head_nll(x, w, targets, 15.0, 20)), argnums=(0, 1))(x, w)
    assert all(bool(jnp.isnan(a).all()) for a in weighted(weights))
    assert all(bool(jnp.isfinite(a).all()) for a in weighted(ignored_only))
    monkeypatch.setattr(head, "_recompute_grads", real_recompute)
    ref_w = jax.grad(lambda x, w: jnp.sum(weights * reference(x, w, targets, 15.0)), argnums=(0, 1))(x, w)
    for a, r in zip(weighted(weights), ref_w):
        assert_close_nontrivial(a, r, rtol=1e-4, atol=1e-5)


def test_chunked_head_bf16_matches_unchunked_bf16():
    """bf16 compute: chunks give the unchunked result within bf16 rounding, and both stay close to autodiff of
    the bf16 logits. Not closer: a chunk's logits are never stored, so XLA (excess precision allowed, its
    default) may feed the loss the fp32 GEMM result without rounding it to bf16 (measured: NLL off by up to
    0.15% here, 1e-6 with --xla_allow_excess_precision=false); and dW is summed over chunks in fp32."""
    kx, kw, kt, kg = jax.random.split(jax.random.key(4), 4)
    x = jax.random.normal(kx, (4, 32, 64)).astype(jnp.bfloat16)
    w = (0.3 * jax.random.normal(kw, (64, 256))).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (4, 32), 0, 256).at[1, 7].set(-1)
    g = jax.random.normal(kg, (4, 32))
    ref, ref_vjp = jax.vjp(lambda x, w: reference(x, w, targets, 15.0), x, w)
    whole, whole_vjp = jax.vjp(lambda x, w: head_nll(x, w, targets, 15.0, 0), x, w)
    out, out_vjp = jax.vjp(lambda x, w: head_nll(x, w, targets, 15.0, 48), x, w)  # 128 tokens: 3 chunks, padded
    assert out.dtype == jnp.float32
    assert_close_nontrivial(out, whole, rtol=1e-2, atol=1e-2, floor=1.0)  # bf16 eps is 2^-8 = 0.4%
    for a, b, r in zip(out_vjp(g), whole_vjp(g), ref_vjp(g)):
        assert a.dtype == b.dtype == jnp.bfloat16
        a, b, r = (np.asarray(v, np.float64) for v in (a, b, r))
        assert np.abs(b).max() > 1e-3
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2
        assert np.linalg.norm(a - r) / np.linalg.norm(r) < 1e-2


def test_chunked_head_needs_less_memory():
    """XLA's temporaries for the head's gradient, N = 8192 tokens, V = 8192, C = 256, fp32, compiled not run.
    Unchunked, the saved logits z, one (N, V) fp32 tensor (256 MiB), live from the forward through the backward
    (XLA on CPU then writes dz over them). In chunks of 1024 only one chunk's (1024, V) block of logits (32 MiB)
    and its dz exist at a time, beside O(N C + C V) buffers of 8 MiB each: padded copies of x, the gradients dx
    and dW formed in the forward, the backward's scaled copies of them (measured: 89 MiB, under three blocks).
    The saving asserted, half the full logits, leaves room below the ~2/3 measured for XLA to lay buffers out
    differently."""
    n, c, v, chunk = 8192, 256, 8192, 1024
    logits_bytes, block_bytes = n * v * 4, chunk * v * 4

    def temp_bytes(chunk):
        loss = lambda x, w, t: jnp.sum(head_nll(x, w, t, 15.0, chunk))
        args = (jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((c, v), jnp.float32),
                jax.ShapeDtypeStruct((n,), jnp.int32))
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(chunk)
    print(f"head grad temporaries: loss_chunk=0 {whole / 2**20:.1f} MiB, loss_chunk={chunk} "
          f"{chunked / 2**20:.1f} MiB, (N, V) fp32 logits {logits_bytes / 2**20:.0f} MiB")
    assert whole >= logits_bytes
    assert chunked < 3 * block_bytes
    assert whole - chunked >= logits_bytes // 2


def test_model_loss_chunk_matches_whole_batch():
    """The full model's summed loss and every parameter's gradient, --set model.loss_chunk=12 (32 tokens: three
    chunks, the last padded) against loss_chunk=0."""
    base = Config(model=ModelConfig(vocab_size=300, sequence_len=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                    loss_chunk=0), data=DataConfig(tokenizer_vocab=300))
    chunked = apply_overrides(base, ["model.loss_chunk=12"])
    assert chunked.model.loss_chunk == 12 and base.model.loss_chunk == 0
    params = ModelFns(base).init_params(0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))  # move zero-initialised tensors off zero
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    idx = jax.random.randint(jax.random.key(6), (2, 16), 0, 300)
    targets = jnp.roll(idx, -1, axis=1).at[:, -1].set(-1)

    def loss_and_grads(cfg):
        fns = ModelFns(cfg)
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(fns.module(p)(idx, targets=targets))))(params)

    (loss0, grads0), (loss1, grads1) = loss_and_grads(base), loss_and_grads(chunked)
    assert_close_nontrivial(loss1, loss0, rtol=1e-6, atol=0.0, floor=1.0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads0)):
        name = jax.tree_util.keystr(path)
        assert np.abs(np.asarray(b)).max() > 0, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("share", [False, True])
def test_backward_shares_or_recomputes_the_softcap_as_told(monkeypatch, share):
    """On accelerators XLA must not share the forward's fp32 tanh(z / cap) with the backward's recomputation
    (common-subexpression elimination across the custom VJP would store it as an fp32 (N, V) tensor, twice z's
    bytes): the compiled grad then holds two tanh, one per direction. On CPU sharing is allowed: one tanh."""
    monkeypatch.setattr("jaxchat.model.head.share_softcap_with_forward", lambda: share)
    x = jnp.ones((4, 64, 32), jnp.bfloat16)
    w = jnp.ones((32, 512), jnp.bfloat16)
    t = jnp.zeros((4, 64), jnp.int32)
    grad = jax.jit(jax.grad(lambda x, w: head_nll(x, w, t, 15.0, 0).mean(), argnums=(0, 1)))
    assert len(re.findall(r" tanh\(", grad.lower(x, w).compile().as_text())) == (1 if share else 2)


def test_the_softcap_is_shared_on_cpu_only():
    """The rule the test above takes as given: share on CPU (the transcendental is the cost there), recompute on
    accelerators (memory is)."""
    from jaxchat.model.head import share_softcap_with_forward

    assert share_softcap_with_forward() is (jax.default_backend() == "cpu")


def test_auto_chunk_is_cpu_only():
    """model.loss_chunk=-1 (the default): chunks of 1024 tokens on a CPU, the whole batch elsewhere; explicit
    values pass through."""
    assert ModelConfig().loss_chunk == -1
    assert resolve_chunk(0) == 0 and resolve_chunk(12) == 12
    assert resolve_chunk(-1) == (1024 if jax.default_backend() == "cpu" else 0)
    with pytest.raises(ConfigError, match=r"model.loss_chunk=-2 must be an integer >= -1"):
        ModelConfig(loss_chunk=-2)
