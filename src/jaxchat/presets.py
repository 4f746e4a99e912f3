"""Named presets: a full `Config` each, with a one-line description.

`tiny` is the CPU default, sized so `make train` beats xz -9e on the embedded corpus in about a minute of bf16
training on two cores; `cpu-bench` is the CPU benchmark config shared with the reference implementations (4
layers, n_embd 256, 2 heads of 128, vocab 8192, seq 512, batch 8, SSSL, AdamW, fp32). The `d12-*` presets are
the exact configs and AdamW recipes of the seed model cards (trained with flaxchat: tied embeddings, RMSNorm eps
1e-6, 12 heads of 64, seq 1024, batch 256, Chinchilla 20x tokens). `nanochat-*` follow nanochat's architecture
(depth sets the width: C = ceil(64 * depth / 128) * 128, head_dim 128) and its Muon recipe, horizon and batch
rules (see plan.py).
`golf-*` are the parameter-golf models (docs/architecture.md §Golf): the naive baseline and PR #334, vocab 1024,
seq 1024, 524,288 tokens per step, trained with golf's recipe (`optim.optimizer=golf`, optim/golf.py; PR #334:
Muon wd 0.04, warmdown 3000; baseline: no Muon decay, warmdown 1200). `marin-*` are marin's speedrun models (PR
#2184; 2.5 tokens per parameter), trained with the default AdamW.
"""

from __future__ import annotations

from dataclasses import replace

from jaxchat.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxchat.optim.scaling import nanochat_shape

_SEED_CARD_MODEL = ModelConfig(vocab_size=32768, sequence_len=1024, n_layer=12, n_embd=768, n_head=12,
                               n_kv_head=12, tie_embeddings=True, norm_eps=1e-6, mlp="gelu")
_SEED_CARD_OPTIM = OptimConfig(lr=0.01, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0, warmup_steps=500,
                               end_lr_frac=0.05)
_SEED_CARD_TRAIN = TrainConfig(num_steps=19920, batch_size=256, device_batch_size=32, eval_every=1000, save_every=1000,
                               eval_tokens=4 * 1024 * 1024)


def _seed_card(mlp: str, lr: float, steps: int) -> Config:
    return Config(model=replace(_SEED_CARD_MODEL, mlp=mlp), optim=replace(_SEED_CARD_OPTIM, lr=lr),
                  data=DataConfig(tokenizer_vocab=32768), train=replace(_SEED_CARD_TRAIN, num_steps=steps))


_GOLF_BASELINE_MODEL = ModelConfig(
    vocab_size=1024, sequence_len=1024, n_layer=9, n_embd=512, n_head=8, n_kv_head=4, mlp="relu2", mlp_mult=2,
    tie_embeddings=True, embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0, q_gain=1.5, qk_scale=1.0,
    qk_norm_before_rope=True, unet=True, golf_block=True, window_pattern="L", smear=False, backout=False,
    value_embeds=False, residual_lambdas=False, init="golf")
_GOLF_PR334_MODEL = replace(_GOLF_BASELINE_MODEL, n_layer=11, mlp_mult=3, rope_base=50000.0, rope_dims=16,
                            ln_scale=True, smear_v1=True, bigram_buckets=2048, bigram_dim=64, init="golf_ortho")


def _golf(model: ModelConfig, groups: str) -> Config:
    return Config(model=model, data=DataConfig(tokenizer_vocab=1024),
                  optim=OptimConfig(optimizer="golf", groups=groups),
                  train=TrainConfig(num_steps=20000, batch_size=512, device_batch_size=64, eval_every=1000,
                                    save_every=1000, eval_tokens=1024 * 1024))


def _marin(n_layer: int, n_embd: int, n_head: int) -> Config:
    """marin's speedrun PR #2184 model at one size (docs/architecture.md §Marin): head_dim 128 (K = H), MLP 4C
    ReLU^2, untied, vocab 128,256 (Llama 3), seq 2048; partial RoPE as zero frequency slots (half the dims rotate,
    theta 1024, Llama's rotate_half), QK-norm without weight (scale 1), attention scale 1.35/sqrt(D), the norm
    after the embedding (every jaxchat model has it), x0 skip lambdas (1.1, 0), backout of the first 2L/3 layers
    (lambda 0.5), zero-init O, MLP down and lm_head; none of nanochat's smear, value embeddings or windows, no
    logit cap. Horizon 2.5 tokens per parameter (all of them), batch 192 x 2048; trained with the default AdamW
    (marin's own optimizer settings are not in the PR's text)."""
    model = ModelConfig(
        vocab_size=128256, sequence_len=2048, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_head,
        mlp="relu2", tie_embeddings=False, rope_base=1024.0, rope_dims=64, rope_partial="zero_freqs",
        rope_rotate_half=True, qk_scale=1.0, attn_scale_mult=1.35, window_pattern="L", smear=False,
        value_embeds=False, residual_lambdas=True, backout=True, backout_layer=2 * n_layer // 3 - 1,
        logit_softcap=0.0, init="marin")
    return Config(model=model, data=DataConfig(tokenizer_vocab=128256),
                  train=TrainConfig(num_steps=-1, tokens_per_param=2.5, batch_size=192, device_batch_size=16,
                                    eval_every=500, save_every=500, eval_tokens=4 * 1024 * 1024))


# `tiny`'s optimizer (session 11, docs/LOG.md): nanochat's Muon recipe, whose batch scaling (x sqrt(4096/2^19) =
# 0.088) leaves Muon at lr 0.0018 and lm_head at 0.0017 and whose depth-scaled Muon decay (1.66) is far outside
# its fitted range at 2.9M parameters; retuned: Muon lr 0.25 -> 0.022, lm_head 0.04 -> 0.0087, no Muon decay,
# 10 warmup steps (nanochat: 40); the other groups, the warmdown and momentum schedules as nanochat's.
_TINY_GROUPS = '{"muon": {"lr": 0.25, "wd": 0.0}, "lm_head": {"lr": 0.04}, "warmup_steps": 10}'


def nanochat_model(depth: int, sequence_len: int = 2048, vocab_size: int = 32768) -> ModelConfig:
    """nanochat's GPT at `depth`: the width from optim/scaling.py's `nanochat_shape`, ReLU^2, untied."""
    return ModelConfig(vocab_size=vocab_size, sequence_len=sequence_len, n_layer=depth, **nanochat_shape(depth),
                       mlp="relu2")


def _nanochat(depth: int, ratio: float = 12) -> Config:
    """nanochat's recipe: Muon + AdamW groups, horizon ratio x scaling params, batch from the batch-size rule,
    32 sequences per device per micro-batch (gradient accumulation makes up the rest)."""
    return Config(model=nanochat_model(depth), optim=OptimConfig(optimizer="muon"),
                  data=DataConfig(tokenizer_vocab=32768),
                  train=TrainConfig(num_steps=-1, target_param_data_ratio=ratio, batch_size=-1, device_batch_size=32,
                                    eval_every=250, save_every=500, eval_tokens=4 * 1024 * 1024))


PRESETS: dict[str, tuple[str, Config]] = {
    "tiny": (
        "CPU default: 4 layers, n_embd 128, 2 heads of 64, vocab 4096, seq 256, batch 16, 350 steps of nanochat's "
        "Muon recipe retuned for 4,096-token steps (Muon lr 0.25 and lm_head 0.04 before batch scaling, no Muon "
        "decay, warmup 10); beats xz -9e on the embedded corpus in about a minute of bf16 training on 2 cores",
        Config(model=ModelConfig(vocab_size=4096, sequence_len=256, n_layer=4, n_embd=128, n_head=2,
                                 n_kv_head=2, mlp="relu2"),
               optim=OptimConfig(optimizer="muon", groups=_TINY_GROUPS),
               data=DataConfig(tokenizer_vocab=4096),
               train=TrainConfig(num_steps=350, batch_size=16, eval_every=125, eval_tokens=32768, log_every=10))),
    "cpu-bench": (
        "the CPU benchmark config shared with the reference implementations: 4 layers, n_embd 256, 2 heads of 128, "
        "vocab 8192, seq 512, batch 8, SSSL, AdamW, fp32",
        Config(model=ModelConfig(vocab_size=8192, sequence_len=512, n_layer=4, n_embd=256, n_head=2,
                                 n_kv_head=2, mlp="relu2", compute_dtype="float32"),
               optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.01),
               data=DataConfig(tokenizer_vocab=8192),
               train=TrainConfig(num_steps=300, batch_size=8, eval_every=100, eval_tokens=65536, log_every=10))),
    "d12-gelu-chinchilla": (
        "seed card 'GELU d=12 Chinchilla' (261,096,338 params): GELU MLP, tied, AdamW lr 0.01, 19,920 steps x 256 x 1024",
        _seed_card("gelu", 0.01, 19920)),
    "d12-yatnmn-softplus-chinchilla": (
        "seed card 'YatNMN-Softplus d=12 Chinchilla': YatNMN MLP with softplus bias and learnable eps, AdamW lr 0.03",
        _seed_card("yatnmn_softplus", 0.03, 19922)),
    "d12-relu2": (
        "the YatNMN card's ReLU^2 baseline row: the seed-card recipe with nanochat's ReLU^2 MLP, AdamW lr 0.01",
        _seed_card("relu2", 0.01, 19920)),
    "d12-yatnmn": (
        "the YatNMN card's plain YatNMN row: bias, learnable alpha, fixed eps 1e-3, AdamW lr 0.03 (the card's sweep)",
        _seed_card("yatnmn", 0.03, 19920)),
    "golf-baseline": (
        "parameter-golf's naive baseline model (17,059,912 params): 9 U-Net golf blocks, C 512, 8 heads / 4 kv, "
        "MLP 2x ReLU^2, tied, vocab 1024, seq 1024; golf's Muon (NS5) + Adam recipe, warmdown 1200",
        _golf(_GOLF_BASELINE_MODEL, '{"muon": {"wd": 0.0}, "warmdown_iters": 1200}')),
    "golf-pr334": (
        "parameter-golf PR #334's model (26,666,073 params): 11 layers, MLP 3x, BigramHash 2048 x 64, SmearGate, "
        "partial RoPE 16/64 base 50000, LN scale, OrthoInit; PR #334's recipe: golf Muon lr 0.04 wd 0.04, Adam, "
        "warmdown 3000",
        _golf(_GOLF_PR334_MODEL, '{"muon": {"wd": 0.04}, "warmdown_iters": 3000}')),
    "marin-150m": (
        "marin speedrun PR #2184 150m: 6L, C 512, 4 heads of 128, MLP 4C ReLU^2, vocab 128,256 untied, seq 2048, "
        "partial RoPE (zero freqs, theta 1024), x0 skip, backout 2L/3, 2.5 tokens/param; AdamW",
        _marin(6, 512, 4)),
    "marin-270m": (
        "marin speedrun PR #2184 270m: 11L, C 768, 6 heads of 128, otherwise as marin-150m",
        _marin(11, 768, 6)),
    "marin-460m": (
        "marin speedrun PR #2184 460m: 16L, C 1024, 8 heads of 128, otherwise as marin-150m",
        _marin(16, 1024, 8)),
    "nanochat-d12": (
        "nanochat d12 (C 768, 6 heads of 128, untied, ReLU^2, seq 2048; 286,261,730 params), Muon recipe, ratio 12",
        _nanochat(12)),
    "nanochat-d20": (
        "nanochat d20 (C 1280, 10 heads of 128, seq 2048), Muon recipe, tokens = 12 x scaling params",
        _nanochat(20)),
    "nanochat-d24": (
        "nanochat's speedrun model: d24 (C 1536, 12 heads of 128, seq 2048), Muon recipe, ratio 8",
        _nanochat(24, ratio=8)),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} (`jaxchat presets` lists them)")
    return PRESETS[name][1]
