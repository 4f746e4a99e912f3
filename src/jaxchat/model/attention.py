"""Attention backends behind one function.

`attend(q, k, v, window=..., q_pos=..., k_pos=..., k_len=..., backend=...)` is the seam every backend plugs into.
Shapes: q (B, T, H, D); k, v (B, S, K, D) with K dividing H (GQA: each kv head serves G = H/K query heads).
Positions are absolute token positions, so the same code serves training (q_pos == k_pos == arange(T)) and
KV-cache decoding (q_pos = cache_len + arange(T), k_pos = arange(S), keys at or beyond k_len are empty slots).

Masking: query at position t sees keys at positions t-w .. t (w+1 keys), where w is the layer's window.

Backends (`model.attention`):
- `xla`: the reference; an explicit fp32 softmax over a (T, S) score matrix with a real sliding-window mask.
  Written with einsums so GQA never repeats K/V in memory. Any device, any dtype, training and decoding.
- `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`, BTNH layout,
  `is_causal=True`, GQA native (K/V are not repeated), the window as `local_window_size=(w, 0)` (JAX turns that
  into cuDNN's exclusive sliding-window length w+1, i.e. keys t-w..t like ours). Training path only (q_pos ==
  k_pos == arange(T), no k_len): the decode path always uses `xla`. Needs an NVIDIA GPU and bf16/fp16 inputs;
  asking for it elsewhere raises a `ConfigError` that says what to use instead.
- `auto`: `cudnn` where it can run (CUDA GPU, bf16/fp16, head_dim a multiple of 8 and <= 256 on Hopper, <= 128
  before), `xla` otherwise. Resolved at trace time from the actual shapes and dtype.
There is no TPU here, so the Pallas splash-attention backend is not written yet; it would register in
`BACKENDS` the same way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxchat.config import ConfigError


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int, k_len: jax.Array | None = None) -> jax.Array:
    """Boolean (T, S) mask: True where query q_pos[t] may attend to key k_pos[s]."""
    dist = q_pos[:, None] - k_pos[None, :]  # how far back the key is
    mask = (dist >= 0) & (dist <= window)
    if k_len is not None:
        mask &= (k_pos < k_len)[None, :]
    return mask


def xla_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    qg = q.reshape(B, T, K, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(D)))
    mask = window_mask(q_pos, k_pos, window, k_len)
    scores = jnp.where(mask[None, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return y.reshape(B, T, H, D)


@functools.lru_cache(maxsize=None)
def cuda_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first CUDA GPU JAX sees, or None when there is none (CPU, TPU, ROCm)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    if dev.platform != "gpu" or "cuda" not in str(getattr(dev.client, "platform_version", "")).lower():
        return None
    cc = getattr(dev, "compute_capability", None)
    if not cc:
        return None
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return major, minor


def cudnn_unsupported_reason(q, k, k_len=None) -> str | None:
    """Why cuDNN flash attention cannot run these inputs here (None: it can)."""
    cc = cuda_compute_capability()
    if cc is None:
        platform = jax.devices()[0].platform
        return f"it needs an NVIDIA GPU with cuDNN, and JAX sees only {platform} devices"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it needs bfloat16/float16 inputs, got {q.dtype} (set model.compute_dtype=bfloat16)"
    D = q.shape[-1]
    d_max = 256 if cc >= (9, 0) else 128
    if D % 8 or D > d_max:
        return f"head_dim={D} must be a multiple of 8 and <= {d_max} on this GPU (compute capability {cc})"
    if k_len is not None or q.shape[1] != k.shape[1]:
        return "it serves only the training path (queries and keys at the same positions, no KV cache)"
    return None


def cudnn_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    """cuDNN flash attention; assumes q_pos == k_pos == arange(T) (the training path, see module docstring)."""
    reason = cudnn_unsupported_reason(q, k, k_len)
    if reason is not None:
        raise ConfigError(f"model.attention='cudnn' cannot run here: {reason}. "
                          f"Use model.attention=auto (cuDNN where it can run, xla elsewhere) or xla.")
    T, D = q.shape[1], q.shape[-1]
    local = None if window >= T - 1 else (window, 0)  # a window covering the whole prefix is plain causal
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(D), is_causal=True,
                                        local_window_size=local, implementation="cudnn")


def auto_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    fn = cudnn_attention if cudnn_unsupported_reason(q, k, k_len) is None else xla_attention
    return fn(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos, k_len=k_len)


BACKENDS = {"xla": xla_attention, "cudnn": cudnn_attention, "auto": auto_attention}


def resolve_backend(backend: str, q, k, k_len=None) -> str:
    """The backend that actually runs for these inputs (`auto` resolved); for reports and tests."""
    if backend == "auto":
        return "cudnn" if cudnn_unsupported_reason(q, k, k_len) is None else "xla"
    return backend


def attend(q, k, v, *, window: int, q_pos, k_pos, k_len=None, backend: str = "xla"):
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ConfigError(f"attention backend {backend!r} is not available: choose one of {sorted(BACKENDS)}") from None
    return fn(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos, k_len=k_len)
