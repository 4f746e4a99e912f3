"""The math of training: the jitted train step, the train state, the mesh and shardings.

`make_train_step` builds a pure `step(state, batch) -> (state, metrics)`: state = {params, opt_state, step, skipped,
and avg when the run averages weights (averaging.py)} (plain pytrees of arrays), batch = (inputs, targets) of shape
(grad_accum, micro_batch, T). Gradients of the summed token NLL are accumulated over micro-batches with `lax.scan`
and divided by the total token count, so accumulation equals the large batch. On a CPU a micro-batch may run as
interleaved slices, independent branches of one program (`model.batch_streams`, `resolve_streams`). A non-finite
loss or gradient never reaches the params or the optimizer moments: the update is discarded inside the step (no
host sync; an optimizer of optim/adamw.py's `SkipsNonFinite` skips itself, any other's new state is selected
away) and the loop acts on it one step later.

The loop (loop.py) dispatches step n, then fetches step n-1's metrics, so the host never waits on the device in
the hot path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxchat.config import Config, ConfigError
from jaxchat.model.attention import DATA_AXIS, cuda_compute_capability
from jaxchat.model.gpt import GPT, param_dict
from jaxchat.optim.adamw import keeps_state_when_nonfinite


global_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


TRITON_FUSIONS = "xla_gpu_experimental_all_fusions_with_triton"


def step_compiler_options(capability: tuple[int, int] | None | str = "detect") -> dict:
    """XLA options the train step compiles with, for a CUDA GPU of this compute capability (default: the one JAX
    sees; None: no CUDA GPU). From 9.0 up (H100 measured), XLA's Triton emitter for every fusion: +0.8-1.9% on all
    four MLPs' d12 steps, and the GPU tests pass under it (BENCHMARKS.md, session 6). Nothing elsewhere. An
    XLA_FLAGS entry naming the option wins: `XLA_FLAGS=--xla_gpu_experimental_all_fusions_with_triton=false`."""
    cc = cuda_compute_capability() if capability == "detect" else capability
    if cc is None or cc < (9, 0) or TRITON_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {TRITON_FUSIONS: True}


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the offending update was not applied."""


@dataclass
class ModelFns:
    """The model's static structure (graphdef) and helpers to run it from a plain dict of params."""

    cfg: Config
    graphdef: nnx.GraphDef = field(init=False)

    def __post_init__(self):
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(self.cfg.model)))

    def init_params(self, seed: int) -> dict:
        """Fresh parameters from `model/init.py`'s `init_weights`, built in one compiled call."""
        return jax.jit(lambda: param_dict(GPT(self.cfg.model, nnx.Rngs(params=seed))))()

    def module(self, params: dict) -> GPT:
        return nnx.merge(self.graphdef, params)

    def logits(self, params, idx):
        return self.module(params)(idx)


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device; one device is a mesh of size one)."""
    return Mesh(np.array(devices or jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(None, DATA_AXIS, None))  # (accum, batch, time): batch split over devices


def rows_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS, None))  # (batch, time): evaluation rows split over devices


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())  # params and optimizer moments: a whole copy on every device


def check_batch_fits(cfg: Config, n_devices: int) -> int:
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % n_devices:
        raise ConfigError(
            f"the micro-batch of {micro} sequences (train.batch_size={cfg.train.batch_size} / "
            f"train.grad_accum={cfg.train.grad_accum}) does not divide over {n_devices} devices: "
            f"make batch_size / grad_accum a multiple of {n_devices}")
    streams = cfg.model.batch_streams
    if streams > 1 and (micro // n_devices) % streams:
        raise ConfigError(
            f"model.batch_streams={streams} does not divide the {micro // n_devices} sequences of each device's "
            f"micro-batch: pick a divisor of {micro // n_devices}, or -1 (auto)")
    return micro


STREAM_TOKENS = 2048  # auto streams only where each slice holds at least this many tokens (tiny, cpu-bench)


def resolve_streams(setting: int, micro: int, seq_len: int) -> int:
    """`model.batch_streams` for a micro-batch of `micro` sequences of `seq_len` tokens: slices of it the train step
    computes as independent branches of one program. -1 (auto) is 2 on a single-device CPU run whose micro-batch
    splits into two slices of >= STREAM_TOKENS tokens, else 1. XLA:CPU runs independent ops side by side, so two
    branches keep both cores in work while one branch waits on a GEMM's threads or runs a short elementwise
    pass (on 2 AMD EPYC cores, alternating A/Bs: cpu-bench fp32 -1.5 to -3.6%, bf16 -1 to -4%, tiny bf16 -5%;
    docs/LOG.md, session 15). The loss and the gradients are the same sums over the same tokens, added in
    another order."""
    if setting > 0:
        return setting
    if jax.default_backend() == "cpu" and jax.device_count() == 1 and micro % 2 == 0 \
            and micro // 2 * seq_len >= STREAM_TOKENS:
        return 2
    return 1


def make_train_step(fns: ModelFns, optimizer: optax.GradientTransformation, nonfinite: str = "halt",
                    averaging=None):
    def loss_sum(params, x, y):
        nll = fns.module(params)(x, targets=y)  # fused lm_head + cross-entropy (model/head.py)
        return jnp.sum(nll), jnp.sum(y >= 0)

    def streamed_loss_sum(params, x, y):
        S = resolve_streams(fns.cfg.model.batch_streams, *x.shape)
        if S == 1:
            return loss_sum(params, x, y)
        # slice s is rows s, s + S, ...: under a data-parallel mesh each device's rows hold every slice equally
        slices = [loss_sum(params, x.reshape(-1, S, x.shape[1])[:, s], y.reshape(-1, S, y.shape[1])[:, s])
                  for s in range(S)]
        return sum(loss for loss, _ in slices), sum(count for _, count in slices)

    grad_fn = jax.value_and_grad(streamed_loss_sum, has_aux=True)

    def step(state, batch):
        inputs, targets = batch
        params = state["params"]

        def micro(carry, xy):
            g_acc, l_acc, n_acc = carry
            (l, n), g = grad_fn(params, *xy)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

        if inputs.shape[0] == 1:  # no accumulation: skip the loop (a length-1 scan stays a while loop on GPU)
            (loss_total, count), grads = grad_fn(params, inputs[0], targets[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_total, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.int32(0)),
                                                         (inputs, targets))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_total / denom
        with jax.named_scope("optimizer"):
            grad_norm = global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            if keeps_state_when_nonfinite(optimizer):  # it skips itself on `finite` (optim/adamw.py)
                updates, opt_state = optimizer.update(grads, state["opt_state"], params, finite=finite)
            else:
                updates, opt_state = optimizer.update(grads, state["opt_state"], params)
                opt_state = keep(opt_state, state["opt_state"])
            new_params = optax.apply_updates(params, updates)
        new_state = {"params": keep(new_params, params), "opt_state": opt_state,
                     "step": state["step"] + 1,
                     "skipped": state["skipped"] + jnp.where(finite, 0, 1).astype(jnp.int32)}
        if averaging is not None:  # EMA / SWA of the params the step keeps (averaging.py)
            new_state["avg"] = averaging.update(state["avg"], new_state["params"], state["step"])
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "skipped": new_state["skipped"]}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0, compiler_options=step_compiler_options() or None)


def init_state(fns: ModelFns, optimizer, seed: int, averaging=None) -> dict:
    """{params, opt_state, step, skipped}, plus "avg" (the EMA / SWA, averaging.py) when `averaging` is given."""
    return state_from_params(fns.init_params(seed), optimizer, averaging)


def state_from_params(params, optimizer, averaging=None) -> dict:
    """The step-0 train state around `params` (seeded init, or fine-tuning's pretrained weights)."""
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0), "skipped": jnp.int32(0)}
    if averaging is not None:
        state["avg"] = averaging.init(params)
    return state


def abstract_state(fns: ModelFns, optimizer, sharding=None, averaging=None) -> dict:
    """The train state as ShapeDtypeStructs (nothing allocated), each placed with `sharding` when given: the
    target Orbax restores into (a checkpoint saved on another device count restores onto this one)."""
    shapes = jax.eval_shape(lambda: init_state(fns, optimizer, 0, averaging))
    if sharding is None:
        return shapes
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def one_device():
    """The sharding of a state held whole on the first local device (eval, sample, export)."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def shaped_batch(inputs: np.ndarray, targets: np.ndarray, grad_accum: int):
    B, T = inputs.shape
    return inputs.reshape(grad_accum, B // grad_accum, T), targets.reshape(grad_accum, B // grad_accum, T)
