"""MLP variants, chosen by name through a small registry (docs/architecture.md §MLP).

| name            | y =                                                           | params per layer          |
|-----------------|---------------------------------------------------------------|---------------------------|
| relu2           | c_proj(relu(x W_fc)^2)                                        | W_fc (C,4C), W_proj (4C,C)|
| leaky_relu2     | c_proj(leaky_relu(x W_fc, 0.5)^2)                             | same                      |
| gelu            | c_proj(gelu_tanh(x W_fc))                                     | same                      |
| swiglu          | c_proj(silu(x W_gate) * (x W_up)), hidden round(8C/3)         | 3 C F ~= 8 C^2            |
| yatnmn          | c_proj(YatNMN(x)), bias, learnable alpha, eps fixed           | + bias (4C), alpha (1)    |
| yatnmn_softplus | as yatnmn with softplus(bias) and eps = softplus(eps_raw)     | + bias, alpha, eps_raw    |

YatNMN (nmn): y_j = alpha * (x.w_j + b_j)^2 / (||x - w_j||^2 + eps), with the distance expanded as
||x||^2 + ||w_j||^2 - 2 x.w_j so the whole layer is one GEMM. The distance is accumulated in fp32 (in bf16 the
expansion cancels catastrophically when x is close to w_j).

`model.mlp_mult` sets the hidden width of relu2, leaky_relu2 and gelu (F = mlp_mult * C; 4 by default, golf 2 or 3).

Kernels are (in, out); the weights are created here with placeholder values and given their real initial
values by `init.init_weights`, the one function that initialises every tensor.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.dtypes import F32
from jaxchat.model import cpu_dots


def _param(*shape):
    return nnx.Param(jnp.zeros(shape, F32))


def matmul(x, w, dtype):
    """x @ w in the compute dtype with fp32 params cast at use."""
    return cpu_dots.matmul(x.astype(dtype), w.astype(dtype))


class Dense(nnx.Module):
    """A bias-free linear layer, kernel (in, out)."""

    def __init__(self, d_in: int, d_out: int):
        self.kernel = _param(d_in, d_out)

    def __call__(self, x, dtype=F32):
        return matmul(x, self.kernel[...], dtype)


class ReluSquaredMLP(nnx.Module):
    def __init__(self, C: int, cfg):
        self.c_fc = Dense(C, cfg.mlp_mult * C)
        self.c_proj = Dense(cfg.mlp_mult * C, C)

    def __call__(self, x, dtype=F32):
        h = self.c_fc(x, dtype)
        a = relu_squared(h) if cpu_dots.wants_f32_result(h.dtype) else jnp.square(jax.nn.relu(h))
        return self.c_proj(a, dtype)


@jax.custom_vjp
def relu_squared(h):
    """relu(h)^2 in h's low-precision dtype on a CPU, as autodiff of the jnp expression computes it (each op in
    fp32, rounded to h's dtype), with the roundings done by cpu_dots.rounded: XLA:CPU's own converts cost as much
    as the rest of these passes (cpu-bench bf16 MLP forward + backward per layer 37.1 -> 34.5 ms, the same bits)."""
    return cpu_dots.rounded(jnp.square(jnp.maximum(h.astype(F32), 0.0)), h.dtype)


def _relu_squared_fwd(h):
    return relu_squared(h), h


def _relu_squared_bwd(h, g):
    hf = h.astype(F32)
    return (cpu_dots.rounded(jnp.where(hf > 0, g.astype(F32) * (2.0 * hf), 0.0), h.dtype),)


relu_squared.defvjp(_relu_squared_fwd, _relu_squared_bwd)


class LeakyReluSquaredMLP(ReluSquaredMLP):
    def __call__(self, x, dtype=F32):  # LeakyReLU(0.5)^2
        return self.c_proj(jnp.square(jax.nn.leaky_relu(self.c_fc(x, dtype), 0.5)), dtype)


GELU_K, GELU_C = math.sqrt(2.0 / math.pi), 0.044715  # gelu_tanh(x) = x * 0.5 * (1 + tanh(K (x + C x^3)))


@jax.custom_vjp
def gelu_tanh(x):
    """`jax.nn.gelu` (its default tanh approximation), forward for forward, with a hand-written backward that keeps
    only x: autodiff of the tanh formula saves four more (tokens, 4C) tensors per layer (x^3 terms, the tanh, its
    complement) and reads them back. The derivative 0.5 (1 + t) + 0.5 x (1 - t^2) K (1 + 3 C x^2), with t
    recomputed from x, is formed in fp32 and cast once, so under bf16 compute it is also more exact than the
    chain of bf16 roundings autodiff takes."""
    return jax.nn.gelu(x)


def _gelu_tanh_fwd(x):
    return jax.nn.gelu(x), x


def _gelu_tanh_bwd(x, g):
    xf = x.astype(F32)
    t = jnp.tanh(GELU_K * (xf + GELU_C * xf * xf * xf))
    slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * xf * xf)
    return ((g.astype(F32) * slope).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def gelu_backward_by_hand() -> bool:
    """Whether GeluMLP differentiates through `gelu_tanh` (accelerators) or autodiff of `jax.nn.gelu` (CPU). On an
    H100 (d12-gelu-chinchilla, 4 x 64 x 1024) the hand-written backward made the step 1% faster (464.9 -> 460.4 ms)
    and 4.5 GiB smaller (38.24 -> 33.74 GiB); on the 2-core CPU recomputing the tanh costs more than the memory it
    saves (cpu-bench GELU step 1,777 vs 1,677 ms). docs/LOG.md, sessions 4 and 5."""
    return jax.default_backend() != "cpu"


class GeluMLP(ReluSquaredMLP):
    def __call__(self, x, dtype=F32):  # tanh approximation, as jax.nn.gelu's default
        gelu = gelu_tanh if gelu_backward_by_hand() else jax.nn.gelu
        return self.c_proj(gelu(self.c_fc(x, dtype)), dtype)


def swiglu_hidden(C: int) -> int:
    return round(8 * C / 3)


class SwiGLUMLP(nnx.Module):
    def __init__(self, C: int, cfg):
        F = swiglu_hidden(C)
        self.c_gate = Dense(C, F)
        self.c_fc = Dense(C, F)
        self.c_proj = Dense(F, C)

    def __call__(self, x, dtype=F32):
        return self.c_proj(jax.nn.silu(self.c_gate(x, dtype)) * self.c_fc(x, dtype), dtype)


class YatNMN(nnx.Module):
    """The nmn YatNMN layer (in, out) with bias and learnable alpha; `softplus` adds softplus(bias) and a
    learnable eps = softplus(epsilon_param)."""

    def __init__(self, d_in: int, d_out: int, eps: float, softplus: bool):
        self.kernel = _param(d_in, d_out)
        self.bias = _param(d_out)
        self.alpha = _param(1)
        self.softplus = softplus
        self.eps = eps
        if softplus:
            self.epsilon_param = _param(1)

    def __call__(self, x, dtype=F32):
        w = self.kernel[...]
        dot = matmul(x, w, dtype).astype(F32)
        x32 = x.astype(F32)
        dist = jnp.sum(x32 * x32, -1, keepdims=True) + jnp.sum(w * w, 0) - 2.0 * dot
        bias = self.bias[...]
        if self.softplus:
            bias = jax.nn.softplus(bias)
            eps = jax.nn.softplus(self.epsilon_param[...])
        else:
            eps = self.eps
        y = jnp.square(dot + bias) / (dist + eps)
        return (y * self.alpha[...]).astype(dtype)


class YatMLP(nnx.Module):
    def __init__(self, C: int, cfg, softplus: bool = False):
        self.c_fc = YatNMN(C, 4 * C, cfg.yatnmn_eps, softplus)
        self.c_proj = Dense(4 * C, C)

    def __call__(self, x, dtype=F32):
        return self.c_proj(self.c_fc(x, dtype), dtype)


class YatSoftplusMLP(YatMLP):
    def __init__(self, C: int, cfg):
        super().__init__(C, cfg, softplus=True)


MLPS = {
    "relu2": ReluSquaredMLP,
    "leaky_relu2": LeakyReluSquaredMLP,
    "gelu": GeluMLP,
    "swiglu": SwiGLUMLP,
    "yatnmn": YatMLP,
    "yatnmn_softplus": YatSoftplusMLP,
}


def make_mlp(C: int, cfg) -> nnx.Module:
    return MLPS[cfg.mlp](C, cfg)
