"""MLP variants, chosen by name through a small registry (SPEC §2).

| name            | y =                                                           | params per layer          |
|-----------------|---------------------------------------------------------------|---------------------------|
| relu2           | c_proj(relu(x W_fc)^2)                                        | W_fc (C,4C), W_proj (4C,C)|
| gelu            | c_proj(gelu_tanh(x W_fc))                                     | same                      |
| swiglu          | c_proj(silu(x W_gate) * (x W_up)), hidden round(8C/3)         | 3 C F ~= 8 C^2            |
| yatnmn          | c_proj(YatNMN(x)), bias, learnable alpha, eps fixed           | + bias (4C), alpha (1)    |
| yatnmn_softplus | as yatnmn with softplus(bias) and eps = softplus(eps_raw)     | + bias, alpha, eps_raw    |

YatNMN (nmn): y_j = alpha * (x.w_j + b_j)^2 / (||x - w_j||^2 + eps), with the distance expanded as
||x||^2 + ||w_j||^2 - 2 x.w_j so the whole layer is one GEMM. The distance is accumulated in fp32 (in bf16 the
expansion cancels catastrophically when x is close to w_j).

Kernels are (in, out); the weights are created here with placeholder values and given their real initial
values by `gpt.init_weights`, the one function that initialises every tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


def _param(*shape):
    return nnx.Param(jnp.zeros(shape, F32))


def matmul(x, w, dtype):
    """x @ w in the compute dtype with fp32 params cast at use."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype))


class Dense(nnx.Module):
    """A bias-free linear layer, kernel (in, out)."""

    def __init__(self, d_in: int, d_out: int):
        self.kernel = _param(d_in, d_out)

    def __call__(self, x, dtype=F32):
        return matmul(x, self.kernel[...], dtype)


class ReluSquaredMLP(nnx.Module):
    def __init__(self, C: int, cfg):
        self.c_fc = Dense(C, 4 * C)
        self.c_proj = Dense(4 * C, C)

    def __call__(self, x, dtype=F32):
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x, dtype))), dtype)


class GeluMLP(ReluSquaredMLP):
    def __call__(self, x, dtype=F32):
        return self.c_proj(jax.nn.gelu(self.c_fc(x, dtype)), dtype)  # tanh approximation, as jax.nn.gelu default


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
    "gelu": GeluMLP,
    "swiglu": SwiGLUMLP,
    "yatnmn": YatMLP,
    "yatnmn_softplus": YatSoftplusMLP,
}


def make_mlp(C: int, cfg) -> nnx.Module:
    return MLPS[cfg.mlp](C, cfg)
