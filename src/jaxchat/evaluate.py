"""Validation loss and bits per byte (docs/architecture.md §Data), next to what general-purpose compressors achieve.

bpb = sum(NLL over targets whose token has bytes > 0) / (ln 2 * sum(bytes of those targets)),
where a token's bytes is the length of its UTF-8 decoding and special tokens count 0. Tokenizers of the
SentencePiece kind count bytes by parameter-golf's rule (data/bytecount.py): a target with a leading "▁" has one
byte more unless the token before it (the input at its position) is a boundary such as BOS; and, as golf, the
NLL of every target is summed. The per-token NLL comes
from the same fused head as the training loss (model/head.py: logits in the compute dtype, soft-cap and
log-softmax in fp32, as nanochat evaluates under autocast), so val loss and train loss are one function and no
fp32 (batch, T, vocab) logits are held.
The compressor baselines (gzip -9, xz -9e) are measured on exactly the bytes the model is scored on: the
UTF-8 bytes of the evaluated target tokens, row by row, in order.
"""

from __future__ import annotations

import gzip
import lzma
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.data.bytecount import ByteRule
from jaxchat.data.loader import split_row
from jaxchat.distributed import global_array, local_positions


def target_byte_counts(rule: ByteRule):
    """A jittable `(inputs, targets) -> (bytes per target int32, counted-for-bpb mask)` for `rule`; targets < 0
    (masked) are 0 bytes and not counted. inputs[..., i] is the token before targets[..., i]."""
    base = jnp.asarray(rule.base, jnp.int32)
    lead = jnp.asarray(rule.leading_space, jnp.int32)
    not_boundary = jnp.asarray(~rule.boundary, jnp.int32)
    contextual, all_targets = rule.contextual, rule.all_targets

    def counts(inputs, targets):
        valid = targets >= 0
        t = jnp.maximum(targets, 0)
        nbytes = base[t]
        if contextual:
            nbytes = nbytes + lead[t] * not_boundary[jnp.maximum(inputs, 0)]
        nbytes = jnp.where(valid, nbytes, 0)
        return nbytes, (valid if all_targets else nbytes > 0)

    return counts


def make_eval_step(fns, byte_rule):
    """The jitted eval step; `byte_rule` is a ByteRule (tokenizer.byte_rule()) or a per-token byte table."""
    rule = byte_rule if isinstance(byte_rule, ByteRule) else ByteRule.flat(byte_rule)
    counts = target_byte_counts(rule)

    @jax.jit
    def eval_step(params, inputs, targets):
        nll = fns.module(params)(inputs, targets=targets)
        valid = targets >= 0
        nbytes, counted = counts(inputs, targets)
        return {"nll": jnp.sum(jnp.where(valid, nll, 0.0)), "tokens": jnp.sum(valid),
                "nll_bytes": jnp.sum(jnp.where(counted, nll, 0.0)), "bytes": jnp.sum(nbytes)}

    return eval_step


def eval_rows(rows: np.ndarray, batch_size: int, max_tokens: int) -> np.ndarray:
    """The validation rows an evaluation uses: the first ones, enough for max_tokens targets."""
    T = rows.shape[1] - 1
    n = min(len(rows), max(1, math.ceil(max_tokens / T)))
    n = max(batch_size, (n // batch_size) * batch_size) if len(rows) >= batch_size else len(rows)
    return np.asarray(rows[:n])


def evaluate(eval_step, params, rows: np.ndarray, batch_size: int, sharding=None) -> dict:
    """Mean val loss (nats/token) and bpb over `rows` (N, T+1) (masked entries: data/loader.py)."""
    tot = {"nll": 0.0, "tokens": 0, "nll_bytes": 0.0, "bytes": 0}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        x, y = split_row(chunk)
        if sharding is not None and len(chunk) % sharding.mesh.size == 0:  # rows split over the mesh
            shape = x.shape
            mine = local_positions(sharding, shape, axis=0)  # (several processes: the rows this one's devices hold)
            x, y = (global_array(np.ascontiguousarray(a[mine]), sharding, shape) for a in (x, y))
        out = jax.device_get(eval_step(params, x, y))
        for k in tot:
            tot[k] += float(out[k])
    return {"val_loss": tot["nll"] / max(tot["tokens"], 1),
            "val_bpb": tot["nll_bytes"] / (math.log(2) * max(tot["bytes"], 1)),
            "val_tokens": int(tot["tokens"]), "val_bytes": int(tot["bytes"])}


def target_bytes(tokenizer, rows: np.ndarray) -> bytes:
    """The UTF-8 bytes of every target token of `rows`, in order (specials and masked entries contribute
    nothing). For the SentencePiece kind each run of tokens between boundaries is decoded alone, so a word after
    BOS has no leading space, as the byte rule counts it."""
    specials = set(tokenizer.special_ids) if hasattr(tokenizer, "special_ids") else {tokenizer.bos_id}
    rule = tokenizer.byte_rule() if hasattr(tokenizer, "byte_rule") else None
    parts = []
    for row in rows:
        if rule is not None and rule.contextual:
            segment = []
            for t in [*map(int, row[1:]), -1]:  # (rows start with BOS: the first target follows a boundary)
                if t in specials or t < 0:
                    parts.append(tokenizer.decode(segment).encode("utf-8"))
                    segment = []
                else:
                    segment.append(t)
            continue
        ids = [int(t) for t in row[1:] if int(t) >= 0 and int(t) not in specials]
        parts.append(tokenizer.decode(ids).encode("utf-8"))
    return b"".join(parts)


def compressor_bpb(data: bytes) -> dict:
    """Bits per byte of gzip -9 and xz -9e on `data`."""
    n = max(len(data), 1)
    return {"gzip_bpb": 8 * len(gzip.compress(data, compresslevel=9)) / n,
            "xz_bpb": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / n}
