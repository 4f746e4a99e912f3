"""What checkpoint checksums cost: the checksum pass (integrity.py) against a synchronous save and a restore of
the same train state, for one or more presets, on this machine's default device.

    python benchmarks/checkpoint_integrity.py --preset tiny --preset cpu-bench [--repeat 3]

Prints one line per preset: state size, checksum time, save and restore time, and the checksum time as a
share of each. The checksum runs once per save and once per restore.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax

from jaxchat.checkpoint import Checkpointer
from jaxchat.integrity import array_checksums
from jaxchat.presets import get_preset
from jaxchat.optim import build_optimizer
from jaxchat.train import ModelFns, abstract_state, init_state


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(preset: str, repeat: int) -> str:
    cfg = get_preset(preset)
    fns = ModelFns(cfg)
    optimizer = build_optimizer(cfg, None)
    state = jax.block_until_ready(jax.jit(lambda: init_state(fns, optimizer, 0))())
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    array_checksums(state)  # compile once
    checksum = timed(lambda: array_checksums(state), repeat)
    with tempfile.TemporaryDirectory() as d:
        ckpt = Checkpointer(d, keep_last=repeat + 1, async_save=False)
        steps = iter(range(1, 1000))
        save = timed(lambda: ckpt.save(next(steps), state, {"preset": preset}), repeat)  # (includes a checksum)
        abstract = abstract_state(fns, optimizer)
        restore = timed(lambda: jax.block_until_ready(ckpt.restore(abstract)[0]), repeat)  # (includes a checksum)
        ckpt.close()
    return (f"{preset}: state {nbytes / 2**20:,.1f} MiB | checksum {checksum * 1e3:,.1f} ms | save {save * 1e3:,.1f} ms "
            f"(checksum {checksum / save:.0%} of it) | restore {restore * 1e3:,.1f} ms (checksum {checksum / restore:.0%} "
            f"of it) | {jax.devices()[0].device_kind}, jax {jax.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", required=True)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    for preset in args.preset:
        print(measure(preset, args.repeat), flush=True)


if __name__ == "__main__":
    main()
