"""parameter-golf's export quantisation (PR #334 `quantize_state_dict_mixed` / `dequantize_state_dict_mixed`;
docs/golf.md §Quantisation), on a state dict in the reference's names and PyTorch layout (golf/names.py makes
one from a jaxchat run).

Per tensor, in the reference's order of rules:
- not floating point -> stored as is ("passthrough_nonfloat");
- <= 65,536 elements -> "passthrough": fp32 when the name holds a control pattern (attn_scale, mlp_scale,
  resid_mix, q_gain, skip_weight(s)), else fp16 (its original dtype recorded, to restore on load);
- a matrix whose name says MLP ("mlp" anywhere) or attention (".attn.", ".c_q.", ".c_k.", ".c_v.") -> the
  matrix scheme: int5 (PR #334: |q| <= 15) or int6 (|q| <= 31), per row: s = fp16(max(rowmax|w| / r, 1e-12)),
  raised to fp16's smallest normal, q = clamp(round(w / s), -r, r); or int8 (the naive baseline's choice);
- anything else (tok_emb, the bigram embedding, ...) -> int8: per row, clip at the 99.99984th percentile of
  |w| (torch.quantile's linear interpolation, in fp32), s = max(clip / 127, 1/127), q = round(clip(w) / s) in
  [-127, 127], s stored fp16; a tensor that is not a matrix gets one fp32 scale.
Dequantisation is q * s (per row), cast back to the original dtype. `q` is int8 in every scheme: int5/int6 is
the range, not the container (zstd finds the unused bits).

Every step is numpy float32 with the reference's operation order, so q and scales equal the reference's
bitwise (tests/test_golf_quant.py checks them against tests/fixtures/golf_pr334_tiny.npz).
"""

from __future__ import annotations

import numpy as np

MATRIX_SCHEMES = ("int5", "int6", "int8")  # what MLP and attention matrices get (--quant)
INT_RANGE = {"int5": 15, "int6": 31}
KEEP_FLOAT_MAX_NUMEL = 65_536
CONTROL_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
                    "skip_weight", "skip_weights")
INT8_CLIP_Q = 99.99984 / 100.0
FP16_TINY = np.finfo(np.float16).tiny  # smallest normal fp16, 2^-14


def classify(name: str) -> str:
    """The reference's `_classify_param`: 'mlp', 'attn' or 'other' from the tensor's name alone."""
    if "mlp" in name:
        return "mlp"
    if ".attn." in name or ".c_q." in name or ".c_k." in name or ".c_v." in name:
        return "attn"
    return "other"


def _lerp32(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """torch.lerp in float32: a + w (b - a) below w = 0.5, b - (b - a)(1 - w) from it (the form that is exact
    at both ends)."""
    d = (b - a).astype(np.float32)
    one = np.float32(1)
    return np.where(w < 0.5, a + w * d, b - d * (one - w)).astype(np.float32)


def quantile32(a: np.ndarray, q: float, axis: int | None) -> np.ndarray:
    """torch.quantile(a, q, dim=axis) (linear interpolation) for float32 `a`, computed as torch does: the rank
    q * (n - 1) in float32, the two neighbours of the sorted values, float32 lerp. numpy's own quantile works
    in float64 and differs in the last bit."""
    a = np.asarray(a, np.float32)
    if axis is None:
        a, axis = a.reshape(-1), 0
    s = np.sort(a, axis=axis)
    n = s.shape[axis]
    rank = np.float32(q) * np.float32(n - 1)
    lo = int(np.floor(rank))
    hi = int(np.ceil(rank))
    w = np.float32(rank - np.float32(lo))
    return _lerp32(np.take(s, lo, axis=axis), np.take(s, hi, axis=axis), w)


def quantize_int8(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's `quantize_float_tensor`: (q int8, scale fp16 per row) for a matrix, (q, fp32 scalar
    scale) otherwise."""
    t32 = np.asarray(t, np.float32)
    if t32.ndim == 2:
        clip = quantile32(np.abs(t32), INT8_CLIP_Q, axis=1) if t32.size else np.zeros(t32.shape[0], np.float32)
        clipped = np.clip(t32, -clip[:, None], clip[:, None])
        scale = np.maximum(clip / np.float32(127.0), np.float32(1.0 / 127.0)).astype(np.float32)
        q = np.clip(np.round(clipped / scale[:, None]), -127, 127).astype(np.int8)
        return q, scale.astype(np.float16)
    clip = float(quantile32(np.abs(t32), INT8_CLIP_Q, axis=None)) if t32.size else 0.0
    scale = np.float32(clip / 127.0 if clip > 0 else 1.0)  # (Python float division, then fp32: as the reference)
    c = np.float32(clip)
    q = np.clip(np.round(np.clip(t32, -c, c) / scale), -127, 127).astype(np.int8)
    return q, np.asarray(scale, np.float32)


def quantize_int_n(t: np.ndarray, clip_range: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's `quantize_intN_per_row`: per-row absmax scale in fp16, |q| <= clip_range."""
    t32 = np.asarray(t, np.float32)
    if t32.ndim == 2:
        row_max = np.abs(t32).max(axis=1)
        scale = np.maximum(row_max / np.float32(clip_range), np.float32(1e-12)).astype(np.float16)
        scale = np.maximum(scale, FP16_TINY).astype(np.float16)
        q = np.clip(np.round(t32 / scale.astype(np.float32)[:, None]), -clip_range, clip_range).astype(np.int8)
        return q, scale
    amax = float(np.abs(t32).max())
    scale = np.asarray(max(amax / clip_range, 1e-12), np.float16)
    q = np.clip(np.round(t32 / scale.astype(np.float32)), -clip_range, clip_range).astype(np.int8)
    return q, scale


def _keep_float(name: str, t: np.ndarray, orig_dtypes: dict) -> np.ndarray:
    # (np.array, not np.ascontiguousarray, which turns a 0-d scalar such as bigram.scale into shape (1,))
    if any(p in name for p in CONTROL_PATTERNS):
        return np.array(t, np.float32)
    if t.dtype == np.float32:  # (bf16 has no numpy dtype; a jaxchat state dict is fp32)
        orig_dtypes[name] = "float32"
        return np.array(t, np.float16)
    return np.array(t)


def quantize_state(state: dict[str, np.ndarray], scheme: str = "int5") -> tuple[dict, dict, dict]:
    """(tensors, meta, orig_dtypes) as the reference's `quantize_state_dict_mixed` returns them in its object
    (`result`, `meta`, `passthrough_orig_dtypes`): tensors `name` (passthrough) or `name.q` + `name.scale`;
    meta[name] = "passthrough" / "passthrough_nonfloat" / {"type": "int5" | "int6" | "int8"}. `scheme` is what
    MLP and attention matrices get (PR #334: int5)."""
    if scheme not in MATRIX_SCHEMES:
        raise ValueError(f"quantisation scheme {scheme!r}: choose one of {', '.join(MATRIX_SCHEMES)}")
    tensors, meta, orig_dtypes = {}, {}, {}
    for name, t in state.items():
        t = np.asarray(t)
        if not np.issubdtype(t.dtype, np.floating):
            tensors[name], meta[name] = np.array(t), "passthrough_nonfloat"
            continue
        if t.size <= KEEP_FLOAT_MAX_NUMEL:
            tensors[name], meta[name] = _keep_float(name, t, orig_dtypes), "passthrough"
            continue
        kind = scheme if classify(name) in ("mlp", "attn") and t.ndim >= 2 else "int8"
        q, s = quantize_int8(t) if kind == "int8" else quantize_int_n(t, INT_RANGE[kind])
        tensors[name + ".q"], tensors[name + ".scale"] = q, s
        meta[name] = {"type": kind}
    return tensors, meta, orig_dtypes


def dequantize_state(tensors: dict, meta: dict, orig_dtypes: dict) -> dict[str, np.ndarray]:
    """The reference's `dequantize_state_dict_mixed`: every tensor back to floats (q * s per row; passthrough
    cast back to its recorded dtype). Every quantised tensor was float32 in a jaxchat state dict."""
    out = {}
    for name, info in meta.items():
        if isinstance(info, str):
            t = tensors[name]
            out[name] = t.astype(orig_dtypes[name]) if name in orig_dtypes else t
            continue
        q, s = tensors[name + ".q"].astype(np.float32), tensors[name + ".scale"].astype(np.float32)
        if q.ndim == 2 and s.ndim >= 1:
            out[name] = q * s.reshape(q.shape[0], 1)
        else:
            out[name] = q * s
    return out
