"""Checksums that let a restore tell a damaged checkpoint from a good one.

Orbax stores arrays without checksums: bytes overwritten inside a data file restore as different, often finite,
numbers. So every save records, in the checkpoint's metadata, a 64-bit checksum of each array's bits and a
sha256 of the rest of the metadata; every restore recomputes and compares them (checkpoint.py).

An array's checksum is computed where the array lives (one jitted pass, fused into a reduction: nothing is copied
to the host but two integers per array): each 32-bit word w at flat index i is mixed with its position and
murmur3's finalizer, h = fmix(w ^ i * 0x9E3779B9), and two sums are kept modulo 2^32: sum(h) and
sum(h * (2i + 1)). Integer sums are exact in any order, so the value does not depend on the device, the sharding
or the reduction order, and a changed, swapped or zeroed word changes it (barring a 1-in-2^64 coincidence).
Cost (benchmarks/checkpoint_integrity.py, BENCHMARKS.md): about 1 GB/s on this project's 2-core CPU, a fraction
of the save itself; memory-bound on accelerators.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

VERSION = 1
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive indices over all 32 bits


def _fmix(x):
    """murmur3's 32-bit finalizer (every input bit affects every output bit)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(a):
    """The array's bits as uint32 words (16- and 8-bit types widened, 64-bit types split in two)."""
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32).ravel()
    size = a.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(a, jnp.uint32).ravel()
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(a, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32).ravel()
    return jax.lax.bitcast_convert_type(a, jnp.uint32).ravel()  # 8 bytes -> (..., 2) words


def _array_sums(a):
    w = _words(jnp.asarray(a))
    i = jnp.arange(w.size, dtype=jnp.uint32)
    h = _fmix(w ^ (i * jnp.uint32(_GOLDEN)))
    return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(h * (2 * i + 1), dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree.map(_array_sums, tree))


def array_checksums(tree) -> dict[str, str]:
    """{path: 16 hex digits} for every array of `tree` (paths as jax.tree_util.keystr spells them)."""
    sums = jax.device_get(_tree_sums(tree))
    return {jax.tree_util.keystr(path): "".join(f"{int(x):08x}" for x in np.asarray(v))
            for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def meta_digest(meta: dict) -> str:
    """sha256 of the metadata without its "integrity" entry, as canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(meta: dict, state) -> dict:
    """`meta` with the integrity record of `state` and of itself."""
    meta = {k: v for k, v in meta.items() if k != "integrity"}
    return {**meta, "integrity": {"version": VERSION, "arrays": array_checksums(state),
                                  "meta_sha256": meta_digest(meta)}}


def meta_problem(meta: dict) -> str | None:
    """Why the metadata fails its own checksum, or None (also None when it has none: saved before checksums)."""
    record = meta.get("integrity")
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("meta_sha256") != meta_digest(meta):
        return "its metadata does not match the checksum recorded with it"
    return None


def array_problems(meta: dict, state) -> list[str]:
    """The arrays of `state` whose checksum differs from the one recorded in `meta` (empty when all match)."""
    recorded = meta["integrity"]["arrays"]
    actual = array_checksums(state)
    bad = [p for p in actual if recorded.get(p) != actual[p]]
    bad += [f"{p} (recorded, not restored)" for p in recorded if p not in actual]
    return bad
