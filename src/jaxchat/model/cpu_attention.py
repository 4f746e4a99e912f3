"""The `cpu` attention backend: the `xla` math laid out for XLA:CPU's fast GEMMs, with a hand-written backward.

XLA:CPU runs a batched dot fast only when it is canonical: batch dims leading, lhs (b, M, K) and rhs (b, K, N), both
row-major (cpu_dots.py says why; docs/LOG.md, session 11). Autodiff of `xla_attention`'s einsums gives dots over
(B, T, H, D) operands and transposed score matrices, which XLA:CPU either copies around or runs on its slow paths
(at cpu-bench, attention was 37% of the step's kernel time). Here every one of the five dots is canonical:

    forward   S = Q K^T        (b, M, D) x (b, D, N)         b = B*K (batch, kv head), M = G*T (the group's queries)
              Y = P V          (b, M, N) x (b, N, D)         N = keys, P = softmax(scale * S, masked) in fp32
    backward  dP = dY V^T      (b, M, D) x (b, D, N)
              dV^T = dY^T P    (b, D, M) x (b, M, N)         (dV transposed back: a small (N, D) copy)
              dS = P * (dP - rowsum(dP * P))   (the softmax scale applied to dQ and dK^T instead)
              dQ = scale dS K  (b, M, N) x (b, N, D)
              dK^T = scale Q^T dS  (b, D, M) x (b, M, N)

Only (T, D)-sized operands are ever transposed (in bf16 into new row-major arrays, cpu_dots.transposed); the
(M, N) score matrices never are. P is kept for the backward in fp32 (at most B*H*T*T*4 bytes per layer: 16 MiB at
cpu-bench), so the backward recomputes nothing. GQA is native: a kv head's G query heads are stacked along M.
The queries run in chunks, each over only the keys its window reaches (`query_chunk`): in quarters, no chunk scores
a later chunk's keys (3/8 of the score matrix, all of it causally masked), and under a sliding window no chunk
scores keys that lie wholly behind its window (at cpu-bench, T = 512 and windows of 128, 30% fewer short-window
score FLOPs than halves).

Same function as `xla` (the same fp32 softmax over the same unmasked keys, P rounded to the compute dtype before
P V); equal to fp32 rounding, not bitwise. Training path only (q_pos == k_pos, no KV cache), any device, any dtype;
`auto` picks it on CPU.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jaxchat.config import ConfigError
from jaxchat.dtypes import F32
from jaxchat.model.cpu_dots import rounded, transposed


def cpu_unsupported_reason(q, k, k_len=None) -> str | None:
    """Why the `cpu` backend cannot take these inputs (None: it can)."""
    if k_len is not None or q.shape[1] != k.shape[1]:
        return "it serves only the training path (queries and keys at the same positions, no KV cache)"
    return None


MIN_QUERY_CHUNK = 64


def query_chunk(T: int) -> int:
    """Queries per chunk: quarters, else halves, else all T, in chunks of at least MIN_QUERY_CHUNK. Smaller chunks
    skip more masked scores but run smaller GEMMs and more passes around them. Measured in both dtypes (docs/LOG.md,
    session 17; alternating A/Bs of the train step on 2 cores): at cpu-bench (T = 512) quarters against halves bf16
    0.988x, fp32 0.985x (session 16); eighths against quarters bf16 1.013x (fp32 against halves 1.009x, session
    16). At `tiny` (T = 256) quarters against halves bf16 0.976-0.988x, fp32 0.977x; eighths (32 queries) against
    halves bf16 1.029x."""
    for parts in (4, 2):
        if T % parts == 0 and T // parts >= MIN_QUERY_CHUNK:
            return T // parts
    return T


def _bdot(a, b, out_dtype, scale: float = 1.0):
    """Canonical batched dot scale * a (b, M, K) @ b (b, K, N), accumulated in f32 (an f32 result keeps a bf16 dot
    on XLA:CPU's bf16 GEMMs), rounded to out_dtype."""
    dims = (((2,), (1,)), ((0,), (0,)))
    out = jax.lax.dot_general(a, b, dims, preferred_element_type=F32)
    return rounded(out * scale if scale != 1.0 else out, out_dtype)


def _mask(T: int, S: int, G: int, window: int, offset: int):
    """(G*T, S) boolean: row g*T + t (query t of the group's head g, at position offset + t relative to the first
    key) may see key s iff 0 <= offset + t - s <= window."""
    dist = offset + jnp.arange(T)[:, None] - jnp.arange(S)[None, :]
    return jnp.tile((dist >= 0) & (dist <= window), (G, 1))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped(q, k, v, window: int, G: int, offset: int):
    """q (b, G*T, D), k and v (b, S, D), all in the compute dtype -> y (b, G*T, D)."""
    return _grouped_fwd(q, k, v, window, G, offset)[0]


def _grouped_fwd(q, k, v, window, G, offset):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = _bdot(q, transposed(k), F32) * scale
    s = jnp.where(_mask(q.shape[1] // G, k.shape[1], G, window, offset)[None], s, jnp.finfo(F32).min)
    p = jax.nn.softmax(s, axis=-1)
    return _bdot(rounded(p, v.dtype), v, v.dtype), (q, k, v, p)


def _grouped_bwd(window, G, offset, res, dy):
    q, k, v, p = res
    dt, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
    dy = dy.astype(dt)
    dp = _bdot(dy, transposed(v), F32)
    dv = transposed(_bdot(transposed(dy), rounded(p, dt), dt))
    # dS without the softmax scale: scaled inside YNNPACK's fused dP GEMM + reduction, the constant became a
    # materialised (b, M, N) operand; applied to dQ and dK^T, it is a multiply in their (b, T, D) roundings
    # (bf16 attention fwd + bwd per layer at cpu-bench 26.6 -> 25.0 ms; docs/LOG.md, session 13)
    ds = rounded(p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)), dt)
    dq = _bdot(ds, k, dt, scale)
    dk = transposed(_bdot(transposed(q), ds, dt, scale))
    return dq, dk, dv


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def _split(a, edges):
    """a (B, T, ...) cut along T at `edges` (0, ..., T): {start: piece}. lax.split's transpose is a concatenate, so
    the cotangents of a piece that several query chunks read add up piece by piece. Slicing each chunk's keys
    from the whole instead pads every chunk's cotangent back to T and adds the padded copies: a loop that XLA:CPU
    runs ~4x slower once the pads start at an offset (bf16 cpu-bench step, one core: 0.992x; docs/LOG.md, session
    17)."""
    return dict(zip(edges, jax.lax.split(a, [e1 - e0 for e0, e1 in zip(edges, edges[1:])], axis=1)))


def _join(pieces, start: int, stop: int):
    """The pieces covering [start, stop) joined along T."""
    parts = [piece for edge, piece in pieces.items() if start <= edge < stop]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def cpu_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    """q (B, T, H, D), k and v (B, T, K, D) -> (B, T, H, D); assumes q_pos == k_pos (the training path)."""
    reason = cpu_unsupported_reason(q, k, k_len)
    if reason is not None:
        raise ConfigError(f"model.attention='cpu' cannot run these inputs: {reason}. "
                          f"Use model.attention=auto or xla.")
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    C = query_chunk(T)
    starts = list(range(0, T, C))
    spans = [(max(0, q0 - window), q0 + C) for q0 in starts]  # the keys each chunk of the queries reaches
    edges = sorted({0, T} | {edge for span in spans for edge in span})
    qs, ks, vs = _split(q, starts + [T]), _split(k, edges), _split(v, edges)

    def heads(a):  # keys or values (B, S, K, D) -> (B*K, S, D)
        return jnp.transpose(a, (0, 2, 1, 3)).reshape(B * K, a.shape[1], D)

    # Each chunk goes heads-major from its own pieces, and its output back to (B, C, H, D) before the chunks are
    # joined along T: XLA:CPU fuses each transpose with its join. Transposing the whole (B, T, H, D) first made
    # the joins and their backward transpose through reshapes of B*K, which its loop emitter runs several times
    # slower (bf16 cpu-bench step 0.985x; docs/LOG.md, session 17).
    ys = []
    for q0, (k0, k1) in zip(starts, spans):
        qc = jnp.transpose(qs[q0].reshape(B, C, K, G, D), (0, 2, 3, 1, 4)).reshape(B * K, G * C, D)
        y = _grouped(qc, heads(_join(ks, k0, k1)), heads(_join(vs, k0, k1)), window, G, q0 - k0)
        ys.append(jnp.transpose(y.reshape(B, K, G, C, D), (0, 3, 1, 2, 4)))
    return jnp.concatenate(ys, axis=1).reshape(B, T, H, D)
