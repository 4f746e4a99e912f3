"""The nanochat GPT in Flax NNX (docs/architecture.md §Forward). Every design choice, in forward order:

- token embedding `wte`, then a parameter-free RMSNorm (`norm(x) = x * rsqrt(mean(x^2) + eps)`, no weight);
- smear: each token mixes in the previous token's normed embedding through a sigmoid gate computed from its
  own first 24 channels, scaled by a learned `smear_lambda` (position 0 unchanged);
- `x0` = that input, re-injected before every block: `x = resid_lambdas[i] * x + x0_lambdas[i] * x0`;
- pre-norm blocks: `x += attn(norm(x)); x += mlp(norm(x))`; no biases anywhere;
- attention: RoPE (split halves, base 100000) on q and k, then QK-norm scaled by 1.2 (one op: model/rotary.py),
  GQA, a per-layer sliding window from the pattern string (last layer always long), softmax scale 1/sqrt(D);
- value embeddings on alternating layers (the last included): `v += 3 * sigmoid(h[:12] Wg) * ve_i[idx]`;
- backout: the residual after the middle block (i == L//2; `model.backout_layer`) is subtracted, scaled by
  `backout_lambda` (marin's `norm(x_pred - lam_b * x_context)` is this form with the context's last layer 2L/3 - 1);
- final norm, lm_head (or the tied `wte`), logits sliced to the true vocab, cast to fp32, soft-capped
  `15 * tanh(logits / 15)`; in training that head and the cross-entropy run as one op (model/head.py).

The parameter-golf and marin switches (ModelConfig, docs/architecture.md §Golf; every default is off, leaving the
model above unchanged):
- `bigram_buckets`, `bigram_dim`, `bigram_scale`: golf's BigramHash added to the token embedding before the norm;
  `smear_v1`: golf's per-dim static SmearGate, beside nanochat's `smear` (both: model/embeddings.py);
- `rope_dims`: partial RoPE, only the first R dims of a head rotate (pairs (i, i + R/2)), base `rope_base`;
  `qk_norm_before_rope`: golf's order (norm, RoPE, gain) instead of nanochat's (RoPE, norm * qk_scale);
  `q_gain`: a learned per-query-head gain after RoPE; `attn_scale_mult`: softmax scale mult / sqrt(D) (marin 1.35);
- `golf_block`: per-dim `resid_mix` (x, x0) instead of (or after) the scalar lambdas, per-dim `attn_scale` and
  `mlp_scale` on the branch outputs; `ln_scale`: branch inputs norm(x) / sqrt(l + 1);
- `unet`: encoder layers (i < L//2) push their outputs, decoder layer L//2 + j first adds
  `skip_weights[j] * pop()` (last pushed first);
- `mlp_mult` (hidden width) and the `leaky_relu2` MLP; `logit_softcap` (golf 30); `embed_init_std`; `init`
  (golf's PyTorch-default or OrthoInit schemes, marin's zero lm_head and lambdas, model/init.py);
- marin: `rope_partial=zero_freqs` (partial RoPE as zero frequency slots, model/rotary.py), `rope_rotate_half`
  (Llama's rotation direction), `backout_layer`; `xsa_layers`: XSA (`exclusive`) on the last N layers.
Decoding carries the previous token's normed embedding (`prev_x`, for both smears) and, with BigramHash, its id
(`prev_tok`). U-Net and LN scale are per-layer-static, so they refuse `scan_layers` (config.py).

Shapes (einsum legend): B batch, T time, S key time, C model, H heads, K kv heads, D head dim, V vocab.
Parameters are fp32; matmuls run in `config.compute_dtype`; logits and softmax are fp32.

`GPT.__call__` is the forward, top to bottom; `GPT.layer` is one layer's work (x0 mix, value embedding, block,
backout capture), written once and called by the training path, the scanned groups (model/scan.py) and decoding.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.config import ModelConfig
from jaxchat.dtypes import F32, resolve_compute_dtype
from jaxchat.model.attention import attend, resolve_backend
from jaxchat.model.cpu_dots import rounded
from jaxchat.model.embeddings import BigramHash, previous, smear_nanochat, smear_v1
from jaxchat.model.head import head_nll, resolve_chunk
from jaxchat.model.init import init_weights
from jaxchat.model.mlp import Dense, make_mlp
from jaxchat.model.remat import checkpoint_name, remat
from jaxchat.model.rotary import Positions, model_positions, resolve_impl as resolve_rope_norm, rope_norm
from jaxchat.model.scan import GroupLayer, scan_groups


def norm(x, eps):
    """Parameter-free RMSNorm over the last axis, computed in fp32, returned in x's dtype (cpu_dots.rounded: the
    same bits as astype, cheaper in a fused loop on a CPU)."""
    xf = x.astype(F32)
    return rounded(xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps), x.dtype)


def times_param(p, x):
    """An fp32 parameter p (a scalar or per channel) times an activation x, in x's dtype. The product is
    p.astype(x.dtype) * x bit for bit (a bf16 product is the f32 product rounded once), but autodiff sums p's
    gradient over the batch in f32: a bf16 sum over a whole activation is what XLA:CPU runs as a slow tree of
    reduce-windows (~3 ms each at cpu-bench in bf16, 13 per step; docs/LOG.md, session 11)."""
    if x.dtype == F32:
        return p * x
    return rounded(p.astype(x.dtype).astype(F32) * x.astype(F32), x.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int):
        self.embedding = nnx.Param(jnp.zeros((num, dim), F32))

    def __call__(self, idx):
        return jnp.take(self.embedding[...], idx, axis=0)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        C, H, K, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.cfg, self.window = cfg, cfg.window_sizes()[layer]
        self.xsa = cfg.has_xsa(layer)
        self.c_q, self.c_k, self.c_v = Dense(C, H * D), Dense(C, K * D), Dense(C, K * D)
        self.c_proj = Dense(H * D, C)
        self.ve_gate = Dense(cfg.ve_gate_channels, K) if cfg.has_value_embed(layer) else None
        if cfg.q_gain > 0:
            self.q_gain = nnx.Param(jnp.zeros((H,), F32))

    def __call__(self, h, ve, p: Positions, cache=None):
        cfg, dt, pos = self.cfg, h.dtype, p.pos
        B, T, _ = h.shape
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q = checkpoint_name(self.c_q(h, dt), "q_proj").reshape(B, T, H, D)  # names: model/remat.py
        k = checkpoint_name(self.c_k(h, dt), "k_proj").reshape(B, T, K, D)
        v = checkpoint_name(self.c_v(h, dt), "v_proj").reshape(B, T, K, D)
        if ve is not None:
            gate = 3.0 * jax.nn.sigmoid(self.ve_gate(h[..., : cfg.ve_gate_channels], dt))  # (B, T, K)
            v = v + gate[..., None] * ve.reshape(B, T, K, D).astype(dt)
        impl = cfg.rope_norm if cache is None else "xla"  # model/rotary.py; its kernel serves training only
        q, k = (rope_norm(a, p.cos, p.sin, eps=cfg.norm_eps, scale=cfg.qk_scale, impl=impl,
                          norm_first=cfg.qk_norm_before_rope) for a in (q, k))
        if cfg.q_gain > 0:
            q = q * self.q_gain[...].astype(dt)[:, None]
        if cfg.attn_scale_mult != 1.0:  # the softmax scale becomes attn_scale_mult / sqrt(D)
            q = q * jnp.asarray(cfg.attn_scale_mult, dt)
        if cache is None:
            y = attend(q, k, v, window=self.window, q_pos=pos, k_pos=pos, backend=cfg.attention)
            new_cache = None
        else:  # write this chunk's keys/values at the cache cursor, attend over the filled prefix
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, pos[0], 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, pos[0], 0, 0))
            k_pos = jnp.arange(k_all.shape[1])
            y = attend(q, k_all.astype(dt), v_all.astype(dt), window=self.window, q_pos=pos, k_pos=k_pos,
                       k_len=pos[-1] + 1, backend="xla")
            new_cache = {"k": k_all, "v": v_all}
        if self.xsa:
            y = exclusive(y, v)
        return self.c_proj(y.reshape(B, T, H * D), dt), new_cache


def exclusive(y, v):
    """XSA (exclusive self-attention, parameter golf's later records): each query head's output y (B, T, H, D)
    minus its component along its own token's value vector v (B, T, K, D) of the head's kv group, so attention
    carries only what the token does not already hold: y - (y . v_hat) v_hat, v_hat = v / max(|v|, 1e-12) (torch's
    F.normalize), computed in fp32."""
    B, T, H, D = y.shape
    K = v.shape[2]
    yg = y.astype(F32).reshape(B, T, K, H // K, D)
    vf = v.astype(F32)
    vn = (vf / jnp.maximum(jnp.linalg.norm(vf, axis=-1, keepdims=True), 1e-12))[:, :, :, None, :]
    out = yg - jnp.sum(yg * vn, axis=-1, keepdims=True) * vn
    return out.reshape(B, T, H, D).astype(y.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        self.attn = Attention(cfg, layer)
        self.mlp = make_mlp(cfg.n_embd, cfg)
        self.eps = cfg.norm_eps
        self.ln_div = math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        if cfg.golf_block:
            self.attn_scale = nnx.Param(jnp.zeros((cfg.n_embd,), F32))
            self.mlp_scale = nnx.Param(jnp.zeros((cfg.n_embd,), F32))

    def __call__(self, x, ve, p: Positions, cache=None):
        with jax.named_scope("attention"):  # named scopes label the profiler trace (`jaxchat bench --profile`)
            a, cache = self.attn(self.normed(x), ve, p, cache)
        x = x + checkpoint_name(self.scaled(a, "attn_scale"), "attn_out_proj")
        with jax.named_scope("mlp"):
            m = self.mlp(self.normed(x), x.dtype)
            x = x + checkpoint_name(self.scaled(m, "mlp_scale"), "mlp_out_proj")
        return x, cache

    def normed(self, x):
        """The branch input: norm(x), divided by sqrt(l + 1) with golf's LN scale."""
        h = norm(x, self.eps)
        return h / self.ln_div if self.ln_div != 1.0 else h

    def scaled(self, y, name: str):
        """A branch output times golf's per-dim attn_scale / mlp_scale (unchanged without golf_block)."""
        return times_param(getattr(self, name)[...], y) if hasattr(self, name) else y


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None):
        self.config = cfg
        C, V, L = cfg.n_embd, cfg.padded_vocab_size, cfg.n_layer
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.wte = Embed(V, C)
        self.blocks = nnx.List([Block(cfg, i) for i in range(L)])
        self.value_embeds = nnx.Dict({str(i): Embed(V, kv_dim) for i in range(L) if cfg.has_value_embed(i)})
        self.lm_head = None if cfg.tie_embeddings else Dense(C, V)
        if cfg.residual_lambdas:
            self.resid_lambdas = nnx.Param(jnp.ones((L,), F32))
            self.x0_lambdas = nnx.Param(jnp.zeros((L,), F32))
        if cfg.smear:
            self.smear_gate = Dense(cfg.smear_channels, 1)
            self.smear_lambda = nnx.Param(jnp.zeros((1,), F32))
        if cfg.backout:
            self.backout_lambda = nnx.Param(jnp.zeros((1,), F32))
        if cfg.golf_block:
            self.resid_mix = nnx.Param(jnp.zeros((L, 2, C), F32))
        if cfg.unet:
            self.skip_weights = nnx.Param(jnp.zeros((L // 2, C), F32))
        if cfg.smear_v1:
            self.smear_v1_gate = nnx.Param(jnp.zeros((C,), F32))
        if cfg.bigram_buckets:
            self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, C)
        init_weights(self, rngs if rngs is not None else nnx.Rngs(0))

    def __call__(self, idx, cache=None, targets=None):
        """idx (B, T) int -> fp32 logits (B, T, vocab). With a `cache` (see `init_cache`), idx continues the
        cached sequence and the call returns (logits, new_cache). With `targets` (B, T) (training), it returns
        the per-token fp32 NLL instead, through the fused head (model/head.py): the logits are never stored."""
        cfg = self.config
        dt = jnp.dtype(resolve_compute_dtype(cfg.compute_dtype))
        start = 0 if cache is None else cache["pos"]
        p = model_positions(cfg, start, idx.shape[1])  # rotary tables, for every layer
        x, e = self.embed(idx, dt, p.pos, cache)
        x0, x_mid = x, jnp.zeros_like(x)  # x_mid: x after the middle layer, for the backout
        skips = [] if cfg.unet else None  # the U-Net stack: encoder outputs, popped by the decoder layers

        if cache is None:  # training and evaluation: scanned groups (model/scan.py), then the rest unrolled
            x, x_mid, first = scan_groups(self, x, x0, x_mid, idx, p)
            for i in range(first, cfg.n_layer):
                x, x_mid, _ = self.layer(i, self.train_block(i, p), x, x0, x_mid, idx, skips=skips)
        else:  # decoding: layer by layer, each with its slice of the KV cache
            layer_caches = []
            for i, block in enumerate(self.blocks):
                x, x_mid, layer_cache = self.layer(i, partial(block, p=p), x, x0, x_mid, idx, cache["layers"][i],
                                                   skips=skips)
                layer_caches.append(layer_cache)

        if cfg.backout:
            x = x - times_param(self.backout_lambda[...], x_mid)
        x = norm(x, cfg.norm_eps)
        w_out = self.wte.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        if targets is not None:
            chunk = resolve_chunk(cfg.loss_chunk)
            return head_nll(x, w_out[:, : cfg.vocab_size].astype(dt), targets, cfg.logit_softcap, chunk)
        logits = self.logits(x, w_out)
        if cache is None:
            return logits
        new_cache = {"pos": start + idx.shape[1], "prev_x": e[:, -1].astype(F32), "layers": layer_caches}
        if cfg.bigram_buckets:
            new_cache["prev_tok"] = idx[:, -1].astype(jnp.int32)
        return logits, new_cache

    def layer(self, i: int | GroupLayer, block, x, x0, x_mid, idx, cache=None, skips=None):
        """Layer i's work, the one place it is written (training, scanned groups and decoding all call it):
        re-inject the input x0, run the block (attention, with the layer's value embedding of the tokens idx
        gated into v, then the MLP), keep x after layer `backout_at` (nanochat's L//2, or model.backout_layer) for
        the backout. Per-layer features
        plug in here.

        `block(x, ve, cache=) -> (x, cache)` is block i bound to this forward's positions: the Block itself when
        decoding, its pure function under `model.remat` when training (`train_block`; model/scan.py in a
        scanned group). `i` is a Python int, or inside the scan a `GroupLayer` (traced group, static position).
        With golf's U-Net (`skips`, a list; int `i` only), a decoder layer first adds its weighted skip popped
        from the stack, and an encoder layer (i < L//2) pushes its output.
        Returns (x, x_mid, the layer's new KV cache or None)."""
        n_enc = self.config.n_layer // 2
        if skips is not None and i >= n_enc and skips:
            x = x + times_param(self.skip_weights[i - n_enc], skips.pop())
        x = self.mix_x0(i, x, x0)
        x, cache = block(x, self.value_embed(i, idx), cache=cache)
        if skips is not None and i < n_enc:
            skips.append(x)
        mid = self.config.backout_at
        at_mid = i.is_layer(mid) if isinstance(i, GroupLayer) else i == mid
        if at_mid is True:
            x_mid = x
        elif at_mid is not False:  # a scanned group: this position holds layer L//2 in one group
            x_mid = jnp.where(at_mid, x, x_mid)
        return x, x_mid, cache

    def embed(self, idx, dt, pos, cache=None):
        """Token embedding (+ golf's BigramHash), norm: e; then the smears (model/embeddings.py), each mixing in
        the previous token's e (the cache's `prev_x` for the first token when decoding, as `prev_tok` is its
        token for the bigram). Returns (x, e)."""
        cfg = self.config
        B = idx.shape[0]
        with jax.named_scope("embed"):
            x = self.wte(idx)
            if cfg.bigram_buckets:
                prev_tok = jnp.zeros((B,), jnp.int32) if cache is None else cache["prev_tok"]
                x = x + self.bigram(idx, prev_tok, pos)
            e = norm(x, cfg.norm_eps).astype(dt)
        if not (cfg.smear or cfg.smear_v1):
            return e, e
        prev = previous(e, jnp.zeros((B, e.shape[-1]), dt) if cache is None else cache["prev_x"])
        x = smear_v1(e, prev, self.smear_v1_gate[...], pos) if cfg.smear_v1 else e
        if cfg.smear:
            x = smear_nanochat(x, prev, self.smear_gate, self.smear_lambda[...], cfg.smear_channels, pos)
        return x, e

    def logits(self, x, w_out):
        """Normed final x -> fp32 logits over the true vocab, soft-capped (the evaluation and decoding head)."""
        cfg = self.config
        with jax.named_scope("lm_head"):
            logits = jnp.matmul(x, w_out.astype(x.dtype), preferred_element_type=F32)[..., : cfg.vocab_size]
            if cfg.logit_softcap > 0:
                logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        return logits

    def mix_x0(self, i: int | GroupLayer, x, x0):
        """Re-inject the block input x0 before layer i: resid_lambdas[i] * x + x0_lambdas[i] * x0 (scalars), then
        golf's per-dim resid_mix[i, 0] * x + resid_mix[i, 1] * x0."""
        cfg = self.config
        if isinstance(i, GroupLayer):
            i = i.index  # traced: the lambdas are sliced in the graph
        if cfg.residual_lambdas:
            x = times_param(self.resid_lambdas[i], x) + times_param(self.x0_lambdas[i], x0)
        if cfg.golf_block:
            mix = self.resid_mix[i]
            x = times_param(mix[0], x) + times_param(mix[1], x0)
        return x

    def value_embed(self, i: int | GroupLayer, idx):
        """Layer i's value embedding of the tokens idx, or None on layers without one (a scanned layer carries its
        lookup, made for every group before the scan)."""
        if isinstance(i, GroupLayer):
            return i.ve
        return self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None

    def train_block(self, i: int, p: Positions):
        """Block i as the training path runs it, `block(x, ve, cache) -> (x, None)`: under `model.remat`
        (model/remat.py), as a pure function of its parameters."""
        if self.config.remat == "none":
            return partial(self.blocks[i], p=p)
        gd, state = nnx.split(self.blocks[i])
        fn = remat(lambda state, x, ve: nnx.merge(gd, state)(x, ve, p)[0], self.config.remat)
        return lambda x, ve, cache=None: (fn(state, x, ve), None)

    def init_cache(self, batch: int, max_len: int, dtype=F32) -> dict:
        cfg = self.config
        shape = (batch, max_len, cfg.n_kv_head, cfg.head_dim)
        layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]
        cache = {"pos": jnp.int32(0), "prev_x": jnp.zeros((batch, cfg.n_embd), F32), "layers": layers}
        if cfg.bigram_buckets:
            cache["prev_tok"] = jnp.zeros((batch,), jnp.int32)
        return cache


def resolved_kernels(cfg: ModelConfig, batch: int = 1) -> dict:
    """Which implementations the training step runs for this config on this machine ("auto" resolved):
    {"attention": xla | blocked | cpu | cudnn | splash, "rope_norm": xla | pallas, "loss_chunk": tokens per chunk
    of the fused head, 0 = all at once}, for the train and bench reports."""
    dt = jnp.dtype(resolve_compute_dtype(cfg.compute_dtype))
    T, D = cfg.sequence_len, cfg.head_dim
    q = jax.ShapeDtypeStruct((batch, T, cfg.n_head, D), dt)
    k = jax.ShapeDtypeStruct((batch, T, cfg.n_kv_head, D), dt)
    return {"attention": resolve_backend(cfg.attention, q, k),
            "rope_norm": "xla" if cfg.partial_first_dims or cfg.qk_norm_before_rope
            else resolve_rope_norm(cfg.rope_norm, q.shape, dt),
            "loss_chunk": resolve_chunk(cfg.loss_chunk)}


def token_nll(logits, targets):
    """Per-token negative log-likelihood (fp32); positions with target -1 get 0."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, logz - tgt, 0.0)


def cross_entropy(logits, targets):
    """Mean cross-entropy over targets != -1 (nanochat's ignore_index=-1)."""
    nll = token_nll(logits, targets)
    n = jnp.maximum(jnp.sum(targets >= 0), 1)
    return jnp.sum(nll) / n


def param_dict(model: nnx.Module) -> dict:
    """The model's parameters as a plain nested dict of arrays (the pytree the train step works on)."""
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def key_name(k) -> str:
    """One step of a path: a dict key, a sequence index, an attribute name, or (nnx flat state paths) itself."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_path(keypath) -> tuple[str, ...]:
    """A parameter's path as strings (a jax key path or an nnx flat state path), without the trailing `.value`
    of an nnx Variable."""
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return tuple(key_name(k) for k in keypath)
