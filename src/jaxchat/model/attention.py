"""Attention backends behind one function.

`attend(q, k, v, window=..., q_pos=..., k_pos=..., k_len=..., backend=...)` is the seam every backend plugs into.
Shapes: q (B, T, H, D); k, v (B, S, K, D) with K dividing H (GQA: each kv head serves G = H/K query heads).
Positions are absolute token positions, so the same code serves training (q_pos == k_pos == arange(T)) and
KV-cache decoding (q_pos = cache_len + arange(T), k_pos = arange(S), keys at or beyond k_len are empty slots).

Masking: query at position t sees keys at positions t-w .. t (w+1 keys), where w is the layer's window.

Backends (`model.attention`):
- `xla`: the reference; an explicit fp32 softmax over a (T, S) score matrix with a real sliding-window mask.
  Written with einsums so GQA never repeats K/V in memory. Any device, any dtype, training and decoding.
- `blocked`: the `xla` math per block of 64 queries, each over only the keys its window reaches (t-w .. t):
  score blocks that the causal mask or a sliding window hide entirely are never computed (at T = 256, 10 of 16
  blocks for a causal layer). T a multiple of 64, 2 to 16 blocks (unrolled at trace time); training path only.
  Equal to `xla` to fp32 rounding; on a 2-core CPU the `tiny` step is 8-16% faster with it, for 1.5 s more
  compile time (cpu-bench: 10% faster, 4.4 s more compile).
- `cpu`: the `xla` math with every dot canonical for XLA:CPU's GEMMs and a hand-written backward
  (model/cpu_attention.py); the first half of the queries skips the second half of the keys. Training path only,
  any device and dtype. On a 2-core AMX CPU: cpu-bench bf16 step 540 -> 416 ms against `blocked`, `tiny` bf16
  226 -> 171 ms; fp32 within a few percent of `blocked` (docs/LOG.md, session 11).
- `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`, BTNH layout,
  `is_causal=True`, GQA native (K/V are not repeated), the window as `local_window_size=(w, 0)` (JAX turns that
  into cuDNN's exclusive sliding-window length w+1, i.e. keys t-w..t like ours). Training path only (q_pos ==
  k_pos == arange(T), no k_len): the decode path always uses `xla`. Needs an NVIDIA GPU and bf16/fp16 inputs;
  asking for it elsewhere raises a `ConfigError` that says what to use instead.
- `splash`: Pallas splash attention for TPU (`jax.experimental.pallas.ops.tpu.splash_attention`), one kernel
  per batch element (vmapped), heads-major layout (H, T, D), q pre-scaled by 1/sqrt(D) (the kernel does not
  scale), the window as a `LocalMask` with left size w and right size 0 (keys t-w..t like ours; a window >= T-1
  is a plain `CausalMask`). GQA native: the MHA kernel takes K kv heads and maps q head h to kv head h // (H/K),
  the same grouping as `xla`, so K/V are not repeated. Fused backward kernel (dq, dk, dv in one pass); blocks
  of 512, 256 or 128 (the largest dividing T). Training path only, like `cudnn`; needs a TPU and T a multiple
  of 128; asking for it elsewhere raises a `ConfigError` that says what to use instead. Under a mesh whose
  `data` axis splits the batch (set around the trace with `jax.set_mesh`, as train, bench and the dry run do)
  the kernel runs under `shard_map`, each chip on its own rows. The kernel builder takes an internal
  `interpret` flag so tests run the real kernel in Pallas's interpreter on CPU.
- `auto`: `splash` on a TPU where it can run (T a multiple of 128), else `cudnn` where it can run (CUDA GPU,
  bf16/fp16, head_dim a multiple of 8 and <= 256 on Hopper, <= 128 before), else `cpu` on a CPU (training path),
  else `blocked` where it can run, else `xla`. Resolved at trace time from the actual shapes and dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxchat.config import ConfigError
from jaxchat.model.cpu_attention import cpu_attention, cpu_unsupported_reason


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


BLOCK = 64  # queries per block of the `blocked` backend
MAX_BLOCKS = 16  # its blocks are unrolled at trace time: longer sequences keep the plain xla path


def blocked_unsupported_reason(q, k, k_len=None) -> str | None:
    """Why the `blocked` backend cannot take these inputs (None: it can)."""
    if k_len is not None or q.shape[1] != k.shape[1]:
        return "it serves only the training path (queries and keys at the same positions, no KV cache)"
    T = q.shape[1]
    if T % BLOCK or not 2 <= T // BLOCK <= MAX_BLOCKS:
        return f"sequence length T={T} must be a multiple of {BLOCK} from {2 * BLOCK} to {MAX_BLOCKS * BLOCK}"
    return None


def blocked_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    """The xla math per block of 64 queries, over only the keys that block's window reaches (t-w .. t for its
    queries t): the score blocks a causal or sliding window masks out entirely are never computed, ~40% of the
    scores at T = 256. Same function as `xla` (each query's softmax runs over the same unmasked keys; sums in
    another order, so equal to fp32 rounding, not bitwise). Assumes the training path (q_pos == k_pos =
    start + arange(T)), like `cudnn` and `splash`."""
    reason = blocked_unsupported_reason(q, k, k_len)
    if reason is not None:
        raise ConfigError(f"model.attention='blocked' cannot run these inputs: {reason}. "
                          f"Use model.attention=auto or xla.")
    T = q.shape[1]
    out = []
    for q0 in range(0, T, BLOCK):
        q1, k0 = q0 + BLOCK, max(0, q0 - window)  # the first query of the block reaches back to q0 - window
        out.append(xla_attention(q[:, q0:q1], k[:, k0:q1], v[:, k0:q1], window=window, q_pos=q_pos[q0:q1],
                                 k_pos=k_pos[k0:q1]))
    return jnp.concatenate(out, axis=1)


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


DATA_AXIS = "data"  # the mesh axis the batch is split over (train.make_mesh)


def data_parallel_size() -> int:
    """How many ways the batch is split: the size of the `data` axis of the mesh set around the trace
    (`jax.set_mesh`, as train/bench/dry-run do), 1 with no mesh set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[DATA_AXIS]


SPLASH_BLOCKS = (512, 256, 128)  # splash tiles must be multiples of 128 (TPU lanes); the largest dividing T wins


@functools.lru_cache(maxsize=None)
def _splash_modules():
    """(splash_attention_kernel, splash_attention_mask), or a string saying why this JAX cannot import them.

    Imported on first use, not with this module, so a JAX where the Pallas ops moved still imports attention.py
    and only `splash` reports the problem."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask
    except ImportError as e:
        return f"jax {jax.__version__} has no jax.experimental.pallas.ops.tpu.splash_attention ({e})"
    return splash_attention_kernel, splash_attention_mask


def _splash_input_reason(q, k, k_len) -> str | None:
    """Why the splash kernel cannot take these inputs on any device (None: it can)."""
    modules = _splash_modules()
    if isinstance(modules, str):
        return modules
    if k_len is not None or q.shape[1] != k.shape[1]:
        return "it serves only the training path (queries and keys at the same positions, no KV cache)"
    T = q.shape[1]
    if T % SPLASH_BLOCKS[-1]:
        return f"sequence length T={T} must be a multiple of {SPLASH_BLOCKS[-1]} (its smallest block)"
    return None


def splash_unsupported_reason(q, k, k_len=None) -> str | None:
    """Why Pallas splash attention cannot run these inputs here (None: it can)."""
    platform = jax.devices()[0].platform
    if platform != "tpu":
        return f"it needs a TPU, and JAX sees only {platform} devices"
    return _splash_input_reason(q, k, k_len)


def _splash_kernel(T: int, H: int, window: int, block: int, interpret: bool):
    """The splash MHA kernel for one batch element: q (H, T, D), k/v (K, T, D) with K dividing H -> (H, T, D).

    Keys t-w..t for query t: `LocalMask` with window_size (w, 0), or `CausalMask` when w >= T-1 (the window then
    covers the whole prefix). Built on every trace, not cached here: the kernel holds its block tables as arrays
    made while tracing (a cached one would leak tracers into the next trace), and splash already caches the
    Python work of building those tables from the mask."""
    kernel_lib, mask_lib = _splash_modules()
    if window >= T - 1:
        head_mask = mask_lib.CausalMask((T, T))
    else:
        head_mask = mask_lib.LocalMask((T, T), window_size=(window, 0), offset=0)
    blocks = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                   block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * H), block_sizes=blocks, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def splash_kernel_attention(q, k, v, *, window: int, block: int | None = None, interpret: bool = False):
    """Splash attention over training-path inputs (positions arange(T)): q (B, T, H, D), k/v (B, T, K, D).

    `block` is the kernel tile (default: the largest of 512, 256, 128 dividing T). `interpret=True` runs the
    kernel in Pallas's interpreter, which works on CPU: tests use it; the `splash` backend never does."""
    reason = _splash_input_reason(q, k, None)
    if reason is not None:
        raise ConfigError(f"model.attention='splash' cannot run these inputs: {reason}. "
                          f"Use model.attention=auto or xla.")
    B, T, H, D = q.shape
    if block is None:
        block = next(b for b in SPLASH_BLOCKS if T % b == 0)
    kernel = _splash_kernel(T, H, window, block, interpret)

    def run(q, k, v):  # (b, T, H, D) -> (b, T, H, D), b = the rows this device holds under a mesh
        qh = jnp.swapaxes(q * (1.0 / math.sqrt(D)), 1, 2)  # (b, H, T, D); the kernel applies no softmax scale
        kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        return jnp.swapaxes(jax.vmap(kernel)(qh, kh, vh), 1, 2)

    n = data_parallel_size()
    if n == 1:
        return run(q, k, v)
    if B % n:
        raise ConfigError(f"splash attention under a mesh of {n} devices on 'data' needs a batch divisible by {n}, "
                          f"got {B}: make the per-step batch a multiple of {n}")
    # A pallas_call has no partitioning rule: XLA would gather q, k, v onto every chip and run the whole batch
    # there. shard_map runs the kernel (forward and its fused backward) on each device's own rows instead.
    rows = P(DATA_AXIS)
    return jax.shard_map(run, in_specs=(rows, rows, rows), out_specs=rows, check_vma=False)(q, k, v)


def splash_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    """Pallas splash attention on TPU; assumes q_pos == k_pos == arange(T) (the training path, module docstring)."""
    reason = splash_unsupported_reason(q, k, k_len)
    if reason is not None:
        raise ConfigError(f"model.attention='splash' cannot run here: {reason}. "
                          f"Use model.attention=auto (splash on TPU, cuDNN on NVIDIA GPUs, xla elsewhere) or xla.")
    return splash_kernel_attention(q, k, v, window=window)


def resolve_backend(backend: str, q, k, k_len=None) -> str:
    """The backend that actually runs for these inputs (`auto` resolved); for reports and tests."""
    if backend != "auto":
        return backend
    if splash_unsupported_reason(q, k, k_len) is None:
        return "splash"
    if cudnn_unsupported_reason(q, k, k_len) is None:
        return "cudnn"
    if jax.default_backend() == "cpu" and cpu_unsupported_reason(q, k, k_len) is None:
        return "cpu"
    if blocked_unsupported_reason(q, k, k_len) is None:
        return "blocked"
    return "xla"


def auto_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    fn = BACKENDS[resolve_backend("auto", q, k, k_len)]
    return fn(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos, k_len=k_len)


BACKENDS = {"xla": xla_attention, "blocked": blocked_attention, "cpu": cpu_attention, "cudnn": cudnn_attention,
            "splash": splash_attention, "auto": auto_attention}


def attend(q, k, v, *, window: int, q_pos, k_pos, k_len=None, backend: str = "xla"):
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ConfigError(f"attention backend {backend!r} is not available: choose one of {sorted(BACKENDS)}") from None
    return fn(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos, k_len=k_len)
