"""Several processes training one model (multi-host: a TPU pod slice, GPU nodes, or CPU processes in tests).

jaxchat is SPMD: every process runs the same `jaxchat train` on the same config, sees every device of the job
in one `data` mesh, and traces the same program; JAX moves the gradients between hosts. Who does what:

- batches: each process reads only the rows its own devices hold (`local_positions` of the batch sharding),
  and `global_array` assembles the global batch from the per-process parts without moving data between hosts;
- the run directory must be on a filesystem every process sees (Orbax writes each checkpoint from all of
  them); process 0 alone writes the run's own files (config, tokenizer, data.json, metrics, summary), holds
  the run lock, deletes (`--force`, debris of interrupted saves) and prints; the others are silent;
- the dataset is prepared by process 0 first, then loaded by the others (from the shared cache, or prepared
  again, deterministically, in a per-host one);
- each of those phases runs under `together(...)`: a barrier (no process sees a half-written run directory)
  that also shares the outcome, so an error on one process (a held run lock, a bad dataset) stops them all at
  once with a message, instead of leaving the others waiting until JAX's timeouts abort the job.

A single process (the common case) skips all of this: `global_array` is a plain device_put, `together` a
plain block.
"""

from __future__ import annotations

import contextlib
import itertools

import jax
import numpy as np

from jaxchat.config import ConfigError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False) -> None:
    """Join the job: `coordinator` (host:port of process 0) with `num_processes` and this `process_id`, or with
    `auto` JAX's own detection (TPU pods, SLURM, Open MPI, Kubernetes). Call before anything touches a device."""
    explicit = (coordinator, num_processes, process_id)
    if not auto and any(a is not None for a in explicit):
        missing = [flag for flag, a in zip(("--coordinator", "--num-processes", "--process-id"), explicit)
                   if a is None]
        if missing:
            raise ConfigError(f"a multi-process run needs --coordinator, --num-processes and --process-id together "
                              f"(missing {', '.join(missing)}), or --distributed alone to let JAX detect the "
                              f"cluster (TPU pod, SLURM, Open MPI)")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id={process_id} must lie in [0, --num-processes={num_processes})")
    if not auto and coordinator is None:
        return
    try:  # CPU processes exchange collectives over gloo (the default CPU client has none across processes)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        how = ("JAX found no cluster it knows here (TPU pod slice, SLURM, Open MPI, Kubernetes): start every process "
               "with --coordinator HOST:PORT --num-processes N --process-id I instead" if auto and coordinator is None
               else f"check that process 0 runs at {coordinator} and that the flags match across processes")
        raise ConfigError(f"could not join the multi-process job ({type(e).__name__}: {' '.join(str(e).split())[:300]}): "
                          f"{how}; or drop the flags to train in one process") from None


def is_primary() -> bool:
    """Whether this process writes the run's files and prints (process 0)."""
    return jax.process_index() == 0


def over_processes() -> str:
    """` over N processes` for the run's log line when there are several, else ""."""
    n = jax.process_count()
    return f" over {n} processes" if n > 1 else ""


class JobError(RuntimeError):
    """Another process of a multi-process run stopped with an error, so this one stops too."""


_phases = itertools.count()  # together() calls so far: the same sequence on every process
PHASE_TIMEOUT_MS = 24 * 3600 * 1000  # process 0 may prepare a large dataset while the others wait


@contextlib.contextmanager
def together(what: str):
    """Run one phase of a run (checks, lock, restore, data, run-directory writes) on every process and agree on
    how it ended, which is also a barrier: when the phase raises on any process, every process stops at its end
    (the one that failed with its own error, the others with a `JobError` quoting it) instead of waiting for
    the failed one until JAX's timeouts abort the job. One process: just runs the phase.

    The outcome travels through the job's coordination service (key-value store and barrier), not through a
    device collective: a collective here could pair up with one inside another process's phase (Orbax's
    barriers, say) when that process got further. So a phase must not itself wait on other processes."""
    if jax.process_count() == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # (re-raised below, once every process knows)
        error = e
    from jax._src import distributed  # the coordination client: no public API exposes its key-value store

    client = distributed.global_state.client
    n, count = next(_phases), jax.process_count()
    report = "ok" if error is None else f"{type(error).__name__}: {' '.join(str(error).split())}"[:2000]
    client.key_value_set(f"jaxchat/phase{n}/{jax.process_index()}", report)
    client.wait_at_barrier(f"jaxchat/phase{n}", PHASE_TIMEOUT_MS)
    reports = [client.blocking_key_value_get(f"jaxchat/phase{n}/{i}", 60_000) for i in range(count)]
    if error is not None:
        raise error
    failed = [(i, r) for i, r in enumerate(reports) if r != "ok"]
    if failed:
        i, r = failed[0]
        raise JobError(f"process {i} of {count} stopped with an error while {what} ({r}); this process stops too, "
                       f"having changed nothing")


def local_positions(sharding, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """The indices along `axis` of an array of `shape` placed with `sharding` that this process's devices hold
    (sorted). One process: all of them."""
    if jax.process_count() == 1:
        return np.arange(shape[axis])
    held = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        held.update(range(*index[axis].indices(shape[axis])))
    return np.array(sorted(held), dtype=np.int64)


def global_array(local: np.ndarray, sharding, shape: tuple[int, ...]) -> jax.Array:
    """The array of `shape` placed with `sharding` whose part on this process's devices is `local` (the rows
    `local_positions` named, in order). One process: `local` is the whole array."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, shape)
