"""Muon as nanochat runs it (docs/architecture.md §Optimizer), an optax GradientTransformation for 2-D (in, out)
kernels.

Written by hand because optax's `contrib.muon` has neither Polar Express, NorMuon nor cautious weight decay.
One update, per matrix P with gradient G (lr, momentum m, wd may be schedules of the step count):

    M  = lerp(M, G, 1 - m)                   momentum buffer (fp32)
    U  = lerp(G, M, m)                       Nesterov
    X  = bf16(U) / (1.01 ||U||_F + 1e-6)     Frobenius pre-normalisation (computed in fp32, rounded to bf16)
    X  = 5 Polar Express steps on X (bf16, fp32 accumulation), then back to fp32
    X  = NorMuon(X)                          factored second moment, see `normuon`
    P -= lr_eff X + lr_eff wd P [X P >= 0]   cautious weight decay; lr_eff = lr sqrt(max(1, out / in))

Orientation. nanochat stores PyTorch weights W (out, in); our kernels are K = W^T (in, out). Every
shape-dependent choice is made in PyTorch terms and translated:
- Polar Express: PyTorch "tall" (out > in) forms A = W^T W (in x in) and W <- aW + W B; transposed that is
  A = K K^T, K <- aK + B K. Otherwise (out <= in, square included) A = W W^T = K^T K and K <- aK + K B.
  Either way the Gram matrix is the one over the smaller side, exactly as in nanochat.
- NorMuon: rows >= cols in PyTorch (out >= in) keeps one second moment per row (per output unit, the mean
  over `in`, i.e. over our axis -2, state shape (1, out)); otherwise one per column (per input unit, mean over
  our axis -1, state shape (in, 1)).
- lr factor sqrt(max(1, out / in)): c_fc (C -> 4C) gets 2x, c_proj (4C -> C) 1x.

NorMuon's "rescale to the pre-normalisation Frobenius norm" is read as nanochat's code does it: the norm is
that of the Polar Express output X *before* the per-row/column second-moment normalisation (not the norm
of the raw momentum U, which the Frobenius pre-normalisation already discarded). So NorMuon only
redistributes the update across rows/columns and leaves ||X||_F unchanged.

Scalar coefficients multiply bf16 tensors in fp32 and round once (as PyTorch's opmath does); a plain
`b * A` in JAX would first round b itself to bf16 (8.1566 -> 8.1875). Same-shape matrices are stacked and
processed by one batched computation (`stack=True`). The state (count, momentum, factored second moment) is a
pytree of arrays, so it checkpoints like any optax state.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxchat.dtypes import F32


# Polar Express (Amsel, Persson, Musco, Gower 2025; num_iters=5, safety 2e-2, cushion 2), as in nanochat.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def _scale(coef: float, m: jax.Array) -> jax.Array:
    """coef * m with coef kept in fp32 and one rounding to m's dtype."""
    return (coef * m.astype(F32)).astype(m.dtype)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched a @ b accumulated in fp32, rounded to a's dtype (fp32 inputs at full precision: no TF32)."""
    precision = "highest" if a.dtype == F32 else None
    return jnp.matmul(a, b, precision=precision, preferred_element_type=F32).astype(a.dtype)


def polar_express(g: jax.Array, ns_steps: int = 5, dtype=jnp.bfloat16) -> jax.Array:
    """Approximate polar factor of (..., in, out) kernels: Frobenius pre-normalisation then `ns_steps` Polar
    Express steps in `dtype`. Returns fp32. Singular values in [1e-3, 1] of the normalised input map into
    [0.8589, 1.1411] (the band the 5 coefficients equioscillate in)."""
    x = g.astype(dtype)
    fro = jnp.sqrt(jnp.sum(jnp.square(x.astype(F32)), axis=(-2, -1), keepdims=True))
    x = (x.astype(F32) / (fro * 1.01 + 1e-6)).astype(dtype)
    n_in, n_out = x.shape[-2], x.shape[-1]
    xt = lambda m: jnp.swapaxes(m, -1, -2)  # noqa: E731

    def step(x, abc):
        a, b, c = abc[0], abc[1], abc[2]
        if n_in < n_out:  # PyTorch-tall W (out > in): Gram over `in`
            A = _mm(x, xt(x))
            B = _scale(b, A) + _scale(c, _mm(A, A))
            return _scale(a, x) + _mm(B, x), None
        A = _mm(xt(x), x)  # PyTorch-wide or square: Gram over `out`
        B = _scale(b, A) + _scale(c, _mm(A, A))
        return _scale(a, x) + _mm(x, B), None

    # a scan (not an unrolled loop) keeps the compiled program small; coefficients stay fp32
    x, _ = jax.lax.scan(step, x, jnp.asarray(POLAR_EXPRESS_COEFFS[:ns_steps], F32))
    return x.astype(F32)


def second_moment_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of NorMuon's factored second moment for an (..., in, out) kernel (see the module docstring)."""
    *lead, n_in, n_out = shape
    return (*lead, 1, n_out) if n_out >= n_in else (*lead, n_in, 1)


def lr_factor(shape: tuple[int, ...]) -> float:
    """nanochat's sqrt(max(1, out / in)) for an (in, out) kernel."""
    return math.sqrt(max(1.0, shape[-1] / shape[-2]))


def normuon(x: jax.Array, v: jax.Array, beta2, eps: float = 1e-10) -> tuple[jax.Array, jax.Array]:
    """NorMuon on fp32 (..., in, out) updates `x` with factored second moment `v`: returns (scaled x, new v).

    v <- lerp(v, mean(x^2 over the reduced axis), 1 - beta2); x <- x * rsqrt(max(v, eps)), then rescaled so
    that ||x||_F equals its value before this normalisation."""
    n_in, n_out = x.shape[-2], x.shape[-1]
    axis = -2 if n_out >= n_in else -1
    red = x.shape[axis]
    v_mean = jnp.mean(jnp.square(x), axis=axis, keepdims=True)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * red)
    v = v + (1.0 - beta2) * (v_mean - v)
    step = jax.lax.rsqrt(jnp.maximum(v, eps))
    v_norm_new = jnp.sqrt(jnp.sum(v_mean * red * jnp.square(step), axis=(-2, -1), keepdims=True))
    return x * (step * (v_norm / jnp.maximum(v_norm_new, eps))), v


def muon_matrix_update(g, mom_buf, v, p, *, lr, momentum, weight_decay, beta2, ns_steps, ns_dtype, eps=1e-10):
    """One Muon step for (..., in, out) stacks: returns (update to add to p, new momentum, new second moment).
    `lr` must already include `lr_factor`."""
    g = g.astype(F32)
    mom_buf = mom_buf + (1.0 - momentum) * (g - mom_buf)
    u = g + momentum * (mom_buf - g)
    x = polar_express(u, ns_steps, ns_dtype)
    x, v = normuon(x, v, beta2, eps)
    pf = p.astype(F32)
    mask = (x * pf) >= 0
    update = -(lr * x + lr * weight_decay * pf * mask)
    return update.astype(p.dtype), mom_buf, v


class MuonState(NamedTuple):
    count: jax.Array  # int32, the step the next update uses for its schedules
    momentum: Any  # fp32, same tree as params
    second_moment: Any  # fp32, factored: (1, out) or (in, 1) per kernel


def _at(x: ScalarOrSchedule, count):
    return x(count) if callable(x) else x


def muon(learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule = 0.95,
         weight_decay: ScalarOrSchedule = 0.0, ns_steps: int = 5, beta2: float = 0.9, eps: float = 1e-10,
         ns_dtype=jnp.bfloat16, stack: bool = True) -> optax.GradientTransformation:
    """nanochat's Muon (see the module docstring) for a pytree of 2-D (in, out) kernels.

    learning_rate, momentum, weight_decay: floats or schedules `f(count) -> scalar` (count = 0 on the first
    update). ns_dtype: the Polar Express dtype (bf16 as nanochat; float32 for exactness tests). stack: process
    same-shape kernels as one batch. `update` needs `params` (cautious weight decay)."""

    def init_fn(params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if jnp.ndim(leaf) != 2:
                raise ValueError(f"muon: parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; "
                                 f"Muon updates 2-D (in, out) matrices only: give it to an AdamW group")
        return MuonState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), params),
            second_moment=jax.tree.map(lambda p: jnp.zeros(second_moment_shape(jnp.shape(p)), F32), params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("muon: update() needs params (cautious weight decay reads them)")
        lr = jnp.asarray(_at(learning_rate, state.count), F32)
        mom = jnp.asarray(_at(momentum, state.count), F32)
        wd = jnp.asarray(_at(weight_decay, state.count), F32)
        g_leaves, treedef = jax.tree.flatten(updates)
        m_leaves, v_leaves, p_leaves = (jax.tree.leaves(t) for t in (state.momentum, state.second_moment, params))
        n = len(g_leaves)
        if not (len(m_leaves) == len(v_leaves) == len(p_leaves) == n):
            raise ValueError("muon: updates, params and optimizer state have different tree structures")
        groups: dict[tuple, list[int]] = {}
        for i, g in enumerate(g_leaves):
            key = (tuple(g.shape), jnp.dtype(p_leaves[i].dtype)) if stack else (i,)
            groups.setdefault(key, []).append(i)
        out_u, out_m, out_v = [None] * n, [None] * n, [None] * n
        for idx in groups.values():
            shape = tuple(g_leaves[idx[0]].shape)
            kw = dict(lr=lr * lr_factor(shape), momentum=mom, weight_decay=wd, beta2=beta2, ns_steps=ns_steps,
                      ns_dtype=ns_dtype, eps=eps)
            if len(idx) == 1:
                i = idx[0]
                out_u[i], out_m[i], out_v[i] = muon_matrix_update(g_leaves[i], m_leaves[i], v_leaves[i],
                                                                  p_leaves[i], **kw)
                continue
            st = lambda leaves: jnp.stack([leaves[i] for i in idx])  # noqa: E731
            u, m, v = muon_matrix_update(st(g_leaves), st(m_leaves), st(v_leaves), st(p_leaves), **kw)
            for j, i in enumerate(idx):
                out_u[i], out_m[i], out_v[i] = u[j], m[j], v[j]
        new_state = MuonState(count=optax.safe_int32_increment(state.count),
                              momentum=jax.tree.unflatten(jax.tree.structure(state.momentum), out_m),
                              second_moment=jax.tree.unflatten(jax.tree.structure(state.second_moment), out_v))
        return jax.tree.unflatten(treedef, out_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["POLAR_EXPRESS_COEFFS", "MuonState", "muon", "polar_express", "normuon", "lr_factor",
           "second_moment_shape", "muon_matrix_update"]
