"""The one dtype the code names: F32, in which parameters, optimizer state, logits, softmax and every reduction that
must not round (norms, distances, sums of squares) are kept. Matmuls run in `model.compute_dtype` instead
(config.resolve_compute_dtype): bfloat16 on accelerators and bf16-capable CPUs, float32 on other CPUs."""

import jax.numpy as jnp

F32 = jnp.float32
