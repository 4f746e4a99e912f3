"""A jaxchat GPT in PyTorch for Hugging Face transformers (written by `jaxchat export --format hf`).

The forward of jaxchat's model/gpt.py, switch for switch (docs/architecture.md §Forward and §Golf), in fp32:
token embedding (+ golf's BigramHash), parameter-free RMSNorm, golf's SmearGate and/or nanochat's smear, then per
layer: U-Net skip (decoder layers), x0 re-injection (resid/x0 lambdas, golf's resid_mix), pre-norm attention
(value embedding gated into v, RoPE and QK-norm in either order, per-head q gain, GQA, sliding window) and MLP
(relu2, leaky_relu2, gelu, swiglu, yatnmn, yatnmn_softplus), golf's per-dim branch scales and LN scale; backout
of the middle layer's (or backout_layer's) residual, final norm, head (or the tied wte), logits cut to the true
vocab, soft-cap. marin's switches: partial RoPE as zero frequency slots (rope_partial=zero_freqs) and Llama's
rotation direction (rope_rotate_half); XSA (exclusive self-attention) on the last xsa_layers layers.

Weights: nn.Linear weights are (out, in), the transpose of jaxchat's (in, out) kernels; every other tensor keeps
jaxchat's name and layout under `model.`. There is no KV cache: `generate` runs the whole prefix again for every
new token (exact, O(T^2) per sequence). Padded batches (attention masks with zeros) are refused.
This file needs only torch and transformers; it is copied into every export unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_jaxchat import JaxchatConfig

BIGRAM_P1, BIGRAM_P2 = 36313, 27191  # jaxchat model/embeddings.py (parameter-golf PR #334's BigramHash)


def rms_norm(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def shift_right(x):
    """x (B, T, ...) with row t holding x_{t-1} and row 0 zeros."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def linear(d_in, d_out):
    return nn.Linear(d_in, d_out, bias=False)


def rope(x, cos, sin):
    """Rotate the first R = 2 * cos.shape[-1] dims of x (B, T, N, D), pairs (i, i + R/2); pass the rest through."""
    R = 2 * cos.shape[-1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2, rest = x[..., : R // 2], x[..., R // 2: R], x[..., R:]
    return torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c, rest], dim=-1)


def rope_tables(cfg, T, device):
    """cos, sin (T, R/2) of jaxchat's model/rotary.py: inverse frequencies base^(-2i/R) over the rotated width R
    (rope_dims, golf's first dims; or the head dim). marin's zero_freqs: the tables keep the head's width D/2, the
    first rope_dims/2 slots with frequencies base^(-2i/rope_dims) and the rest 0 (cos 1, sin 0: those pairs pass
    through). rope_rotate_half: Llama's direction, i.e. sin negated."""
    D = cfg.n_embd // cfg.n_head
    f32 = dict(device=device, dtype=torch.float32)
    if cfg.rope_dims and cfg.rope_dims < D and cfg.rope_partial == "zero_freqs":
        R = cfg.rope_dims
        inv_freq = torch.cat([cfg.rope_base ** (-torch.arange(0, R, 2, **f32) / R), torch.zeros(D // 2 - R // 2, **f32)])
    else:
        R = cfg.rope_dims or D
        inv_freq = cfg.rope_base ** (-torch.arange(0, R, 2, **f32) / R)
    angles = torch.arange(T, **f32)[:, None] * inv_freq[None, :]
    return angles.cos(), (-1.0 if cfg.rope_rotate_half else 1.0) * angles.sin()


def exclusive(y, v):
    """XSA: each query head's output y (B, T, H, D) minus its component along its own token's value v (B, T, K, D)
    of the head's kv group (head h reads kv head h // (H/K)): y - (y . v_hat) v_hat, v_hat = v / max(|v|, 1e-12)."""
    B, T, H, D = y.shape
    K = v.shape[2]
    yg = y.reshape(B, T, K, H // K, D)
    vn = (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))[:, :, :, None, :]
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(B, T, H, D)


class BigramHash(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.buckets = cfg.bigram_buckets
        self.embed = nn.Parameter(torch.zeros(cfg.bigram_buckets, cfg.bigram_dim))
        self.proj = linear(cfg.bigram_dim, cfg.n_embd) if cfg.bigram_dim != cfg.n_embd else None
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        B = self.buckets
        prev = shift_right(idx)
        h = ((BIGRAM_P1 % B) * (idx % B) + (BIGRAM_P2 % B) * (prev % B)) % B
        h[:, 0] = 0  # position 0 has no previous token
        e = self.embed[h]
        if self.proj is not None:
            e = self.proj(e)
        return e * self.scale


class YatNMN(nn.Module):
    """y_j = alpha (x.w_j + b_j)^2 / (||x - w_j||^2 + eps); softplus: softplus(b), eps = softplus(epsilon_param)."""

    def __init__(self, d_in, d_out, eps, softplus):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.alpha = nn.Parameter(torch.zeros(1))
        self.eps, self.softplus = eps, softplus
        if softplus:
            self.epsilon_param = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        dot = x @ self.weight.T
        dist = x.pow(2).sum(-1, keepdim=True) + self.weight.pow(2).sum(-1) - 2 * dot
        bias = F.softplus(self.bias) if self.softplus else self.bias
        eps = F.softplus(self.epsilon_param) if self.softplus else self.eps
        return (dot + bias).pow(2) / (dist + eps) * self.alpha


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, self.kind = cfg.n_embd, cfg.mlp
        if self.kind == "swiglu":
            hidden = round(8 * C / 3)
            self.c_gate, self.c_fc, self.c_proj = linear(C, hidden), linear(C, hidden), linear(hidden, C)
        elif self.kind in ("yatnmn", "yatnmn_softplus"):
            self.c_fc = YatNMN(C, 4 * C, cfg.yatnmn_eps, self.kind == "yatnmn_softplus")
            self.c_proj = linear(4 * C, C)
        elif self.kind in ("relu2", "leaky_relu2", "gelu"):
            self.c_fc, self.c_proj = linear(C, cfg.mlp_mult * C), linear(cfg.mlp_mult * C, C)
        else:
            raise ValueError(f"unknown jaxchat mlp {self.kind!r}")

    def forward(self, x):
        if self.kind == "swiglu":
            return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))
        h = self.c_fc(x)
        if self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "leaky_relu2":
            h = F.leaky_relu(h, 0.5).square()
        elif self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        return self.c_proj(h)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        C, H, K, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.cfg, self.window, self.xsa = cfg, cfg.window_sizes()[layer], cfg.has_xsa(layer)
        self.c_q, self.c_k, self.c_v, self.c_proj = linear(C, H * D), linear(C, K * D), linear(C, K * D), linear(H * D, C)
        self.ve_gate = linear(cfg.ve_gate_channels, K) if cfg.has_value_embed(layer) else None
        if cfg.q_gain > 0:
            self.q_gain = nn.Parameter(torch.zeros(H))

    def forward(self, h, ve, cos, sin):
        cfg = self.cfg
        B, T, _ = h.shape
        H, K = cfg.n_head, cfg.n_kv_head
        D = cfg.n_embd // H
        q, k, v = self.c_q(h).view(B, T, H, D), self.c_k(h).view(B, T, K, D), self.c_v(h).view(B, T, K, D)
        if ve is not None:
            gate = 3.0 * torch.sigmoid(self.ve_gate(h[..., : cfg.ve_gate_channels]))  # (B, T, K)
            v = v + gate[..., None] * ve.view(B, T, K, D)

        def rope_norm(a):
            a = rope(rms_norm(a, cfg.norm_eps), cos, sin) if cfg.qk_norm_before_rope else \
                rms_norm(rope(a, cos, sin), cfg.norm_eps)
            return a * cfg.qk_scale

        q, k = rope_norm(q), rope_norm(k)
        if cfg.q_gain > 0:
            q = q * self.q_gain[:, None]
        q = q * cfg.attn_scale_mult
        pos = torch.arange(T, device=h.device)
        dist = pos[:, None] - pos[None, :]
        mask = (dist >= 0) & (dist <= self.window)  # query t sees keys t-w..t
        G = H // K
        qh = q.transpose(1, 2)  # (B, H, T, D); q head h reads kv head h // G, as jaxchat's (K, G) grouping
        kh = k.transpose(1, 2).repeat_interleave(G, dim=1)
        vh = v.transpose(1, 2).repeat_interleave(G, dim=1)
        scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(D)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        y = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)  # (B, T, H, D)
        if self.xsa:
            y = exclusive(y, v)  # v with the value embedding gated in, as in jaxchat
        return self.c_proj(y.reshape(B, T, H * D))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn, self.mlp, self.eps = Attention(cfg, layer), MLP(cfg), cfg.norm_eps
        self.ln_div = math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        if cfg.golf_block:
            self.attn_scale = nn.Parameter(torch.zeros(cfg.n_embd))
            self.mlp_scale = nn.Parameter(torch.zeros(cfg.n_embd))
        self.golf_block = cfg.golf_block

    def forward(self, x, ve, cos, sin):
        a = self.attn(rms_norm(x, self.eps) / self.ln_div, ve, cos, sin)
        x = x + (a * self.attn_scale if self.golf_block else a)
        m = self.mlp(rms_norm(x, self.eps) / self.ln_div)
        return x + (m * self.mlp_scale if self.golf_block else m)


class JaxchatModel(nn.Module):
    """The body and head; parameter names are jaxchat's (model/gpt.py)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, V, L = cfg.n_embd, cfg.padded_vocab_size, cfg.n_layer
        kv_dim = cfg.n_kv_head * (C // cfg.n_head)
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(L)])
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L)
                                           if cfg.has_value_embed(i)})
        self.lm_head = None if cfg.tie_embeddings else linear(C, V)
        if cfg.residual_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if cfg.smear:
            self.smear_gate = linear(cfg.smear_channels, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if cfg.golf_block:
            self.resid_mix = nn.Parameter(torch.zeros(L, 2, C))
        if cfg.unet:
            self.skip_weights = nn.Parameter(torch.zeros(L // 2, C))
        if cfg.smear_v1:
            self.smear_v1_gate = nn.Parameter(torch.zeros(C))
        if cfg.bigram_buckets:
            self.bigram = BigramHash(cfg)

    def forward(self, idx):
        cfg = self.cfg
        T = idx.shape[1]
        # the rotary tables, made here rather than kept as a buffer: transformers builds the model on the meta
        # device and loads only the checkpoint's tensors, so a non-persistent buffer would hold no values
        cos, sin = rope_tables(cfg, T, idx.device)
        x = self.wte(idx)
        if cfg.bigram_buckets:
            x = x + self.bigram(idx)
        e = rms_norm(x, cfg.norm_eps)
        prev = shift_right(e)  # the previous token's normed embedding (zero at position 0)
        x = e
        if cfg.smear_v1:
            g = torch.sigmoid(self.smear_v1_gate)
            x = (1 - g) * x + g * prev
        if cfg.smear:
            x = x + self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., : cfg.smear_channels])) * prev
        x0, x_mid, skips, n_enc = x, torch.zeros_like(x), [], cfg.n_layer // 2
        for i, block in enumerate(self.blocks):
            if cfg.unet and i >= n_enc and skips:
                x = x + self.skip_weights[i - n_enc] * skips.pop()
            if cfg.residual_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if cfg.golf_block:
                x = self.resid_mix[i, 0] * x + self.resid_mix[i, 1] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin)
            if cfg.unet and i < n_enc:
                skips.append(x)
            if i == cfg.backout_at:
                x_mid = x
        if cfg.backout:
            x = x - self.backout_lambda * x_mid
        x = rms_norm(x, cfg.norm_eps)
        w_out = self.wte.weight if self.lm_head is None else self.lm_head.weight  # (V_padded, C)
        logits = (x @ w_out[: cfg.vocab_size].T).float()
        if cfg.logit_softcap > 0:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits


class JaxchatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = JaxchatConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        self.model = JaxchatModel(config)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint (jaxchat's own init is in model/init.py)

    def get_input_embeddings(self):
        return self.model.wte

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("jaxchat models take input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("jaxchat's exported model has no padding support: the attention_mask has zeros. "
                             "Run prompts one at a time or in batches of equal length.")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # the whole prefix: no KV cache
