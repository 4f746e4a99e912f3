"""Configuration of a jaxchat GPT exported for Hugging Face transformers (written by `jaxchat export --format hf`).

The fields are jaxchat's ModelConfig fields that decide the function (docs/architecture.md §Forward and §Golf, where the marin switches are listed too),
under their jaxchat names; the usual transformers names (hidden_size, num_hidden_layers, ...) are set beside them
for tools that read those. This file needs only transformers; it is copied into every export unchanged.
"""

from transformers import PretrainedConfig

# jaxchat ModelConfig field -> default (jaxchat's); the export writes every one of them into config.json
ARCH_DEFAULTS = {
    "vocab_size": 32768, "sequence_len": 2048, "n_layer": 12, "n_embd": 768, "n_head": 6, "n_kv_head": 6,
    "mlp": "relu2", "window_pattern": "SSSL", "tie_embeddings": False, "norm_eps": 2.0 ** -23,
    "rope_base": 100000.0, "qk_scale": 1.2, "logit_softcap": 15.0, "smear": True, "smear_channels": 24,
    "backout": True, "value_embeds": True, "ve_gate_channels": 12, "residual_lambdas": True, "pad_vocab_to": 64,
    "yatnmn_eps": 1e-3, "rope_dims": 0, "qk_norm_before_rope": False, "q_gain": 0.0, "attn_scale_mult": 1.0,
    "ln_scale": False, "smear_v1": False, "bigram_buckets": 0, "bigram_dim": 128, "unet": False,
    "golf_block": False, "mlp_mult": 4, "rope_partial": "first_dims", "rope_rotate_half": False,
    "backout_layer": -1, "xsa_layers": 0,
}


class JaxchatConfig(PretrainedConfig):
    model_type = "jaxchat"

    def __init__(self, **kwargs):
        for name, default in ARCH_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        for hf_name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "max_position_embeddings", "head_dim", "tie_word_embeddings"):
            kwargs.pop(hf_name, None)  # derived below, never read back
        self.hidden_size, self.num_hidden_layers = self.n_embd, self.n_layer
        self.num_attention_heads, self.num_key_value_heads = self.n_head, self.n_kv_head
        self.max_position_embeddings, self.head_dim = self.sequence_len, self.n_embd // self.n_head
        kwargs.setdefault("use_cache", False)  # the PyTorch model has no KV cache: generate re-reads the prefix
        super().__init__(tie_word_embeddings=False, **kwargs)  # a tied head reads wte directly (no tied keys)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def window_sizes(self) -> list:
        """Per-layer window w (query t sees keys t-w..t): L = sequence_len, S = ceil(T/4/128)*128, last layer L."""
        long_w = self.sequence_len
        short_w = min(long_w, -(-self.sequence_len // 4 // 128) * 128)
        pat = self.window_pattern.upper()
        ws = [long_w if pat[i % len(pat)] == "L" else short_w for i in range(self.n_layer)]
        ws[-1] = long_w
        return ws

    @property
    def backout_at(self) -> int:
        """The layer after which the backout takes the residual: nanochat's L//2, or model.backout_layer."""
        return self.n_layer // 2 if self.backout_layer < 0 else self.backout_layer

    def has_xsa(self, layer: int) -> bool:
        """XSA (exclusive self-attention) on the last xsa_layers layers."""
        return layer >= self.n_layer - self.xsa_layers

    def has_value_embed(self, layer: int) -> bool:
        return bool(self.value_embeds) and layer % 2 == (self.n_layer - 1) % 2
