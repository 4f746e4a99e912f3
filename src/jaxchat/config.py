"""Typed, frozen configuration.

Every knob of a run lives in one of four frozen dataclasses, gathered in `Config`. Each class validates itself
on construction and its errors name the bad value and the fix. `--set key=value` strings become a new
`Config` in overrides.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields



class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


MLP_KINDS = ("relu2", "leaky_relu2", "gelu", "swiglu", "yatnmn", "yatnmn_softplus")
INIT_SCHEMES = ("nanochat", "golf", "golf_ortho", "marin")  # see model/init.py
ROPE_PARTIAL_FORMS = ("first_dims", "zero_freqs")  # how rope_dims < head_dim is realised, see model/rotary.py
BIGRAM_MAX_BUCKETS = 32768  # the bigram hash is taken in int32 (model/embeddings.py)
ATTENTION_BACKENDS = ("xla", "blocked", "cpu", "cudnn", "splash", "auto")  # model/attention.py; checked at first use
ROPE_NORM_IMPLS = ("auto", "xla", "pallas")  # RoPE + QK-norm, see model/rotary.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj", "save_out_proj")  # see model/remat.py
# Fields that choose how the step is computed, not what it computes: the parameters and their layout do not depend
# on them, so a run may resume with other values (results then differ only by rounding).
EXECUTION_FIELDS = ("attention", "rope_norm", "scan_layers", "remat", "loss_chunk", "batch_streams")
DTYPES = ("auto", "float32", "bfloat16")  # auto: bf16 on a GPU/TPU or a bf16-capable CPU (dtypes.py)
TRACKERS = ("tensorboard", "wandb")  # train.trackers: see trackers.py


@dataclass(frozen=True)
class ModelConfig:
    """The GPT of docs/architecture.md §Forward; every architectural feature is a field."""

    vocab_size: int = 32768  # token ids the model embeds (>= the tokenizer's vocab)
    sequence_len: int = 2048  # tokens per training sequence (T); also the long attention window
    n_layer: int = 12  # transformer blocks (depth)
    n_embd: int = 768  # model width C
    n_head: int = 6  # query heads (head_dim = n_embd / n_head)
    n_kv_head: int = 6  # key/value heads, dividing n_head (GQA when fewer)
    mlp: str = "relu2"  # one of MLP_KINDS
    window_pattern: str = "SSSL"  # tiled over layers, last layer forced to L
    tie_embeddings: bool = False  # the output head reuses wte (no separate lm_head)
    norm_eps: float = 2.0**-23  # nanochat: fp32 machine epsilon (1.19e-07); flaxchat: 1e-6
    rope_base: float = 100000.0  # RoPE base frequency
    qk_scale: float = 1.2  # q, k = norm(q) * qk_scale, norm(k) * qk_scale
    logit_softcap: float = 15.0  # 0 turns the tanh cap off
    smear: bool = True  # nanochat's smear: mix the previous token's embedding in through a gate
    smear_channels: int = 24  # channels the smear gate reads
    backout: bool = True  # subtract the middle layer's residual (scaled by a learned lambda) before the head
    value_embeds: bool = True  # per-token value embeddings gated into v on alternating layers
    ve_gate_channels: int = 12  # channels the value-embedding gate reads
    residual_lambdas: bool = True  # resid_lambdas and x0_lambdas
    pad_vocab_to: int = 64  # embedding tables are padded up to a multiple of this
    yatnmn_eps: float = 1e-3  # eps of the yatnmn MLP's distance denominator
    attention: str = "auto"  # attention backend, see model/attention.py (auto: the fastest that runs here)
    rope_norm: str = "auto"  # RoPE + QK-norm implementation, one of ROPE_NORM_IMPLS (model/rotary.py)
    compute_dtype: str = "auto"  # params stay fp32; matmuls run in this dtype (dtypes.resolve_compute_dtype)
    scan_layers: bool = False  # run repeating groups of blocks (e.g. SSSL) under lax.scan: one group compiled
    remat: str = "none"  # activation checkpointing policy per block, one of REMAT_POLICIES (model/remat.py)
    loss_chunk: int = -1  # > 0: the fused lm_head + loss over chunks of this many tokens; 0: all at once; -1: auto
    batch_streams: int = -1  # > 0: the train step runs each micro-batch as this many slices in one program; -1: auto
    # The parameter-golf and marin switches (docs/architecture.md §Golf); every default keeps nanochat's model.
    rope_dims: int = 0  # > 0: partial RoPE, only the first rope_dims of each head's dims rotate (golf: 16); 0: all
    qk_norm_before_rope: bool = False  # golf's order (norm, RoPE, q_gain); nanochat's is RoPE then norm * qk_scale
    q_gain: float = 0.0  # > 0: a learned per-query-head gain after RoPE, initialised to this (golf: 1.5)
    attn_scale_mult: float = 1.0  # softmax scale = attn_scale_mult / sqrt(D) (marin: 1.35)
    ln_scale: bool = False  # golf: block l's normed inputs are divided by sqrt(l + 1)
    smear_v1: bool = False  # golf's SmearGate: x_t = (1 - g) x_t + g x_{t-1}, g = sigmoid(gate), gate (C,)
    bigram_buckets: int = 0  # > 0: golf's BigramHash embedding with this many buckets, added to the token embedding
    bigram_dim: int = 128  # its width; projected to n_embd when different
    bigram_scale: float = 0.05  # initial value of its learned output scale
    unet: bool = False  # golf's U-Net skips: encoder outputs re-enter the mirrored decoder layers, per-dim weights
    golf_block: bool = False  # golf's block: per-dim resid_mix (2, C) with x0, per-dim attn_scale and mlp_scale
    mlp_mult: int = 4  # MLP hidden width = mlp_mult * n_embd (relu2, leaky_relu2, gelu; golf: 2 or 3)
    embed_init_std: float = 0.8  # wte ~ N(0, embed_init_std) (golf tied: 0.005)
    init: str = "nanochat"  # initialisation scheme, one of INIT_SCHEMES (model/init.py)
    # marin's forms (speedrun PR #2184) and XSA; defaults keep nanochat's model.
    rope_partial: str = "first_dims"  # partial RoPE: golf's first rope_dims dims rotate, or marin's zero_freqs (the
    #                                   frequency slots past rope_dims/2 are 0, pairs (i, i + D/2) as everywhere)
    rope_rotate_half: bool = False  # Llama/HF rotate_half direction (x1 cos - x2 sin, x2 cos + x1 sin; marin)
    backout_layer: int = -1  # the layer whose output the backout subtracts; -1: nanochat's L//2 (marin: 2L/3 - 1)
    xsa_layers: int = 0  # > 0: XSA on the last N layers (attention output minus its part along the own value)

    def __post_init__(self):
        for name in ("vocab_size", "sequence_len", "n_layer", "n_embd", "n_head", "n_kv_head", "pad_vocab_to"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"model.{name}={v!r} must be a positive integer")
        _check(self.n_embd % self.n_head == 0,
               f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
               f"pick n_head among {[h for h in range(1, 65) if self.n_embd % h == 0]}")
        _check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} (n_embd/n_head) must be even for RoPE")
        _check(self.n_head % self.n_kv_head == 0,
               f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (GQA)")
        _check(self.mlp in MLP_KINDS, f"model.mlp={self.mlp!r} is unknown: choose one of {', '.join(MLP_KINDS)}")
        _check(self.attention in ATTENTION_BACKENDS,
               f"model.attention={self.attention!r} is unknown: choose one of {', '.join(ATTENTION_BACKENDS)}")
        _check(self.rope_norm in ROPE_NORM_IMPLS,
               f"model.rope_norm={self.rope_norm!r} is unknown: choose one of {', '.join(ROPE_NORM_IMPLS)}")
        _check(self.remat in REMAT_POLICIES,
               f"model.remat={self.remat!r} is unknown: choose one of {', '.join(REMAT_POLICIES)}")
        _check(isinstance(self.loss_chunk, int) and self.loss_chunk >= -1,
               f"model.loss_chunk={self.loss_chunk!r} must be an integer >= -1 (tokens per chunk of the fused "
               f"lm_head + loss; 0 computes it for the whole batch at once, -1 chooses: model/head.py)")
        _check(isinstance(self.batch_streams, int) and (self.batch_streams >= 1 or self.batch_streams == -1),
               f"model.batch_streams={self.batch_streams!r} must be a positive integer (slices of each micro-batch "
               f"the train step runs side by side) or -1 (auto: train.py)")
        _check(self.compute_dtype in DTYPES,
               f"model.compute_dtype={self.compute_dtype!r}: choose one of {', '.join(DTYPES)}")
        _check(len(self.window_pattern) > 0 and set(self.window_pattern.upper()) <= {"S", "L"},
               f"model.window_pattern={self.window_pattern!r} must be letters S (short) and L (long), e.g. SSSL")
        _check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        _check(self.logit_softcap >= 0, f"model.logit_softcap={self.logit_softcap} must be >= 0 (0 disables it)")
        if self.smear:
            _check(0 < self.smear_channels <= self.n_embd,
                   f"model.smear_channels={self.smear_channels} must be in 1..n_embd={self.n_embd}")
        self._check_golf()
        if self.value_embeds:
            _check(0 < self.ve_gate_channels <= self.n_embd,
                   f"model.ve_gate_channels={self.ve_gate_channels} must be in 1..n_embd={self.n_embd}")

    def _check_golf(self):
        D = self.head_dim
        _check(isinstance(self.rope_dims, int) and 0 <= self.rope_dims <= D and self.rope_dims % 2 == 0,
               f"model.rope_dims={self.rope_dims!r} must be an even integer in 0..head_dim={D} (0 rotates all dims)")
        _check(self.rope_partial in ROPE_PARTIAL_FORMS,
               f"model.rope_partial={self.rope_partial!r} is unknown: choose one of {', '.join(ROPE_PARTIAL_FORMS)}")
        _check(self.rope_norm != "pallas" or not (self.partial_first_dims or self.qk_norm_before_rope),
               f"model.rope_norm=pallas rotates every dim after the norm; model.rope_dims={self.rope_dims} and "
               f"model.qk_norm_before_rope={self.qk_norm_before_rope} need model.rope_norm=xla (or auto)")
        _check(self.q_gain >= 0, f"model.q_gain={self.q_gain} must be >= 0 (0: no per-head query gain)")
        _check(self.attn_scale_mult > 0, f"model.attn_scale_mult={self.attn_scale_mult} must be > 0")
        _check(isinstance(self.bigram_buckets, int) and 0 <= self.bigram_buckets <= BIGRAM_MAX_BUCKETS,
               f"model.bigram_buckets={self.bigram_buckets!r} must be an integer in 0..{BIGRAM_MAX_BUCKETS} "
               f"(0: no BigramHash)")
        if self.bigram_buckets:
            _check(isinstance(self.bigram_dim, int) and self.bigram_dim > 0,
                   f"model.bigram_dim={self.bigram_dim!r} must be a positive integer with model.bigram_buckets > 0")
        _check(not self.unet or self.n_layer >= 2,
               f"model.unet needs at least 2 layers (one encoder, one decoder), got model.n_layer={self.n_layer}")
        _check(isinstance(self.mlp_mult, int) and self.mlp_mult > 0,
               f"model.mlp_mult={self.mlp_mult!r} must be a positive integer")
        _check(self.mlp_mult == 4 or self.mlp in ("relu2", "leaky_relu2", "gelu"),
               f"model.mlp_mult={self.mlp_mult} applies to relu2, leaky_relu2 and gelu only, not model.mlp="
               f"{self.mlp!r}: leave mlp_mult at 4")
        _check(self.embed_init_std > 0, f"model.embed_init_std={self.embed_init_std} must be > 0")
        _check(isinstance(self.backout_layer, int) and -1 <= self.backout_layer < self.n_layer,
               f"model.backout_layer={self.backout_layer!r} must be a layer index in 0..{self.n_layer - 1} "
               f"(or -1 for nanochat's n_layer // 2)")
        _check(isinstance(self.xsa_layers, int) and 0 <= self.xsa_layers <= self.n_layer,
               f"model.xsa_layers={self.xsa_layers!r} must be an integer in 0..n_layer={self.n_layer} "
               f"(how many of the last layers use XSA; 0: none)")
        _check(self.init in INIT_SCHEMES, f"model.init={self.init!r} is unknown: choose one of {', '.join(INIT_SCHEMES)}")
        if self.scan_layers:
            for name in ("unet", "ln_scale", "xsa_layers"):
                _check(not getattr(self, name), f"model.{name}=true cannot run with model.scan_layers=true (the "
                       f"scanned groups share one compiled body): set model.scan_layers=false")

    @property
    def rotary_dims(self) -> int:
        """How many of each head's dims RoPE rotates."""
        return self.rope_dims or self.head_dim

    @property
    def partial_first_dims(self) -> bool:
        """Golf's partial RoPE (only the first rope_dims dims rotate): tables narrower than D/2, the xla path."""
        return 0 < self.rope_dims < self.head_dim and self.rope_partial == "first_dims"

    @property
    def backout_at(self) -> int:
        """The layer after which the backout takes the residual."""
        return self.n_layer // 2 if self.backout_layer < 0 else self.backout_layer

    def has_xsa(self, layer: int) -> bool:
        return layer >= self.n_layer - self.xsa_layers

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def window_sizes(self) -> tuple[int, ...]:
        """Per-layer window w: query t sees keys t-w..t. L = sequence_len, S = ceil(T/4/128)*128."""
        long_w = self.sequence_len
        short_w = min(long_w, -(-self.sequence_len // 4 // 128) * 128)
        pat = self.window_pattern.upper()
        ws = [long_w if pat[i % len(pat)] == "L" else short_w for i in range(self.n_layer)]
        ws[-1] = long_w
        return tuple(ws)

    def has_value_embed(self, layer: int) -> bool:
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2


@dataclass(frozen=True)
class OptimConfig:
    """`adamw`: AdamW over every parameter with warmup then cosine decay and global-norm clipping (the seed model
    cards' recipe; the fields below). `muon`: nanochat's recipe (Muon for block matrices, six AdamW groups,
    nanochat's schedules and batch scaling; see optim/groups.py), tuned through `groups`, a JSON object of
    overrides (`golf`: parameter golf's recipe, optim/golf.py, with its own `groups` keys), e.g. '{"muon": {"lr": 0.03}, "lm_head": {"lr": 0.004}, "warmup_steps": 20}'."""

    optimizer: str = "adamw"  # adamw (seed cards' recipe) or muon (nanochat's recipe)
    lr: float = 0.01  # peak learning rate (adamw)
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.999  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    warmup_steps: int = 500  # linear warmup steps before the cosine decay
    end_lr_frac: float = 0.05  # cosine decays to this fraction of the peak
    groups: str = ""  # muon only: JSON overrides of the nanochat recipe's groups and schedules

    def __post_init__(self):
        _check(self.optimizer in ("adamw", "muon", "golf"),
               f"optim.optimizer={self.optimizer!r}: choose 'adamw' (seed cards), 'muon' (nanochat recipe) or "
               f"'golf' (parameter golf's Muon + Adam recipe, optim/golf.py)")
        if self.groups:
            try:
                ok = isinstance(json.loads(self.groups), dict)
            except json.JSONDecodeError:
                ok = False
            _check(ok, f"optim.groups={self.groups!r} is not a JSON object: write e.g. "
                       f"optim.groups='{{\"muon\": {{\"lr\": 0.03}}}}'")
        _check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr={self.lr} must be a positive finite number")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optim betas ({self.b1}, {self.b2}) must lie in [0, 1)")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0 <= self.end_lr_frac <= 1, f"optim.end_lr_frac={self.end_lr_frac} must lie in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # the embedded stdlib corpus, or a directory made by `jaxchat data prepare`
    tokenizer_vocab: int = 32768  # size of the BPE tokenizer trained for the run (specials included)
    tokenizer_path: str = ""  # a tokenizer.json to use instead of training one
    data_seed: int = 0  # seed of the batch order (a batch is a pure function of seed and step)
    max_train_chars: int = 0  # 0 = the whole source; else a deterministic prefix of the documents

    def __post_init__(self):
        raw = self.source.startswith("hf:") or self.source.lower().endswith(
            (".txt", ".jsonl", ".parquet", ".bin", ".gz", ".zst")) or any(c in self.source for c in "*?[")
        _check(bool(self.source) and not raw,
               f"data.source={self.source!r}: give 'stdlib' (the embedded corpus) or a dataset directory prepared "
               f"from raw text first: jaxchat data prepare {self.source or 'SOURCE'} --tokenizer tokenizer.json "
               f"--out DIR --seq <model.sequence_len>, then --set data.source=DIR")
        _check(self.source == "stdlib" or self.max_train_chars == 0,
               f"data.max_train_chars={self.max_train_chars} applies to the stdlib corpus only: set it to 0 for the "
               f"prepared dataset {self.source!r} (cap its size with `jaxchat data prepare --max-docs`)")
        _check(self.tokenizer_vocab >= 256 + 9 + 1,
               f"data.tokenizer_vocab={self.tokenizer_vocab} must be >= 266 (256 bytes + 9 specials + 1 merge)")
        _check(self.max_train_chars >= 0, f"data.max_train_chars={self.max_train_chars} must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """How long and how wide a run is. Horizon precedence (nanochat): num_steps > 0, else target_flops > 0, else
    tokens_per_param (marin's TPP, over all parameters), else target_param_data_ratio (tokens per scaling
    parameter). batch_size -1 picks nanochat's batch rule; with
    device_batch_size > 0 the gradient accumulation is derived from it and the device count. `plan.resolve`
    turns these into concrete numbers before a run."""

    num_steps: int = 1000  # -1: derive from target_flops or target_param_data_ratio
    target_flops: float = -1.0  # > 0: derive num_steps from this compute budget (FLOPs)
    target_param_data_ratio: float = -1.0  # nanochat's default when deriving is 12
    tokens_per_param: float = -1.0  # > 0: horizon = this x every parameter, embeddings included (marin: 2.5)
    batch_size: int = 32  # sequences per optimizer step (global); -1: nanochat's batch-size rule
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    device_batch_size: int = 0  # > 0: sequences per device per micro-batch; grad_accum is then derived
    init_seed: int = 0  # seed of the parameter initialisation
    eval_every: int = 250  # 0: only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation
    save_every: int = 0  # 0: only at the end
    log_every: int = 10  # steps between metrics records and progress lines
    sample_tokens: int = 64  # tokens sampled at the end of the run (0: no sample)
    nonfinite: str = "halt"  # NaN/Inf loss or gradient: "halt" (stop, nothing corrupt saved) or "skip" the step
    keep_last: int = 2  # checkpoints kept: the latest keep_last (>= 2, so a bad latest one has a fallback) ...
    keep_every: int = 0  # ... plus every step divisible by keep_every, kept for good (0: none)
    trackers: str = ""  # where metrics also go, comma-separated: tensorboard, wandb (metrics.jsonl always)
    run_name: str = ""  # the run's name in the trackers (default: the run directory's name)
    wandb_project: str = "jaxchat"  # the W&B project, with train.trackers=wandb
    # weight averaging (averaging.py), kept in the train state; off by default
    ema_decay: float = 0.0  # > 0: EMA of the params, ema = ema * decay + params * (1 - decay) every step (golf 0.997)
    swa_lr_below: float = 0.0  # > 0: SWA over the steps whose lr scale is below this, past warmup (golf 0.4)
    swa_every: int = 1  # ... every this many steps (golf 1; other entries 50)
    max_seconds: float = 0.0  # > 0: stop when the run's step time (time_s.train, every process) reaches it,
    #                           checkpointed; golf's optimizer then warms down by wall clock (optim/golf.py)

    @property
    def resolved(self) -> bool:
        return self.num_steps > 0 and self.batch_size > 0

    @property
    def tracker_names(self) -> list[str]:
        return [t.strip() for t in self.trackers.split(",") if t.strip()]

    def __post_init__(self):
        for name in ("grad_accum", "log_every", "eval_tokens"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"train.{name}={v!r} must be a positive integer")
        for name in ("num_steps", "batch_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and (v > 0 or v == -1),
                   f"train.{name}={v!r} must be a positive integer (or -1 to derive it)")
        _check(self.num_steps > 0 or self.target_flops > 0 or self.target_param_data_ratio > 0
               or self.tokens_per_param > 0,
               "train.num_steps=-1 needs a horizon: set train.target_flops, train.tokens_per_param or "
               "train.target_param_data_ratio")
        _check(self.tokens_per_param == -1.0 or (self.tokens_per_param > 0 and math.isfinite(self.tokens_per_param)),
               f"train.tokens_per_param={self.tokens_per_param} must be a positive number (or -1: unused)")
        _check(self.device_batch_size >= 0, f"train.device_batch_size={self.device_batch_size} must be >= 0")
        if self.batch_size > 0 and not self.device_batch_size:
            _check(self.batch_size % self.grad_accum == 0,
                   f"train.batch_size={self.batch_size} does not divide into train.grad_accum={self.grad_accum} "
                   f"micro-batches: use a grad_accum among "
                   f"{[a for a in range(1, self.batch_size + 1) if self.batch_size % a == 0]}")
        _check(self.nonfinite in ("halt", "skip"),
               f"train.nonfinite={self.nonfinite!r}: choose 'halt' (stop at the first NaN/Inf) or 'skip'")
        _check(self.eval_every >= 0 and self.save_every >= 0, "train.eval_every and train.save_every must be >= 0")
        _check(isinstance(self.keep_last, int) and self.keep_last >= 2,
               f"train.keep_last={self.keep_last!r} must be an integer >= 2: with one checkpoint, a latest step that "
               f"turns out unreadable leaves nothing to resume from. Use train.keep_every to keep more for good.")
        _check(self.max_seconds >= 0 and math.isfinite(self.max_seconds),
               f"train.max_seconds={self.max_seconds} must be >= 0 seconds of training (0: no time cap)")
        unknown = [t for t in self.tracker_names if t not in TRACKERS]
        _check(not unknown, f"train.trackers={self.trackers!r}: unknown tracker(s) {unknown}; choose from "
                            f"{', '.join(TRACKERS)} (comma-separated), or '' for metrics.jsonl only")
        _check(isinstance(self.keep_every, int) and self.keep_every >= 0,
               f"train.keep_every={self.keep_every!r} must be >= 0 (0: keep only the last train.keep_last)")
        _check(isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0,
               f"train.ema_decay={self.ema_decay!r} must be in [0, 1): 0 turns the EMA off, golf uses 0.997")
        _check(isinstance(self.swa_lr_below, (int, float)) and 0.0 <= self.swa_lr_below <= 1.0,
               f"train.swa_lr_below={self.swa_lr_below!r} must be in [0, 1] (a fraction of the peak lr): 0 turns SWA "
               f"off, golf uses 0.4")
        _check(isinstance(self.swa_every, int) and self.swa_every >= 1,
               f"train.swa_every={self.swa_every!r} must be a positive integer (1: every eligible step)")
        if self.keep_every:
            _check(self.save_every > 0, f"train.keep_every={self.keep_every} keeps saved steps for good, but "
                                        f"train.save_every=0 saves only the final step: set train.save_every too")
            s, k = self.save_every, self.keep_every
            _check(k % s == 0, f"train.keep_every={k} must be a multiple of train.save_every={s}, so every permanent "
                               f"checkpoint falls on a saved step: use {max(s, k // s * s)} or {(k // s + 1) * s}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _check(self.data.tokenizer_vocab <= self.model.vocab_size or self.data.tokenizer_path
               or self.data.source != "stdlib",  # a prepared dataset brings its own tokenizer (checked at load)
               f"data.tokenizer_vocab={self.data.tokenizer_vocab} exceeds model.vocab_size={self.model.vocab_size}:"
               f" set model.vocab_size >= the tokenizer's vocab")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        sections = {f.name: f.type for f in fields(Config)}
        kw = {}
        classes = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "train": TrainConfig}
        for name, sub in d.items():
            if name not in sections:
                raise ConfigError(f"unknown config section {name!r}: expected one of {list(sections)}")
            cls = classes[name]
            known = {f.name for f in fields(cls)}
            unknown = set(sub) - known
            if unknown:
                raise ConfigError(f"unknown keys in config section {name!r}: {sorted(unknown)}")
            kw[name] = cls(**sub)
        return Config(**kw)
