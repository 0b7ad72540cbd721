"""The umT5 text encoder's config: `TextConfig`, its presets and the reader of transformers' UMT5Config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megawan.config.fields import DTYPES, build, checker, from_preset


@dataclass
class TextConfig:
    """umT5 encoder hyper-parameters (transformers' UMT5Config names)."""

    name: str = "custom"
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    text_len: int = 512  # Wan pads / truncates captions to this many tokens
    params_dtype: str = "float32"

    def validate(self, tensor_parallel: int = 1, prefix: str = "text") -> "TextConfig":
        need = checker(prefix)

        need(self.params_dtype in DTYPES, "params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        need(self.num_heads % tensor_parallel == 0, "num_heads",
             f"num_heads={self.num_heads} is not divisible by tensor_parallel={tensor_parallel}")
        need(self.d_ff % tensor_parallel == 0, "d_ff", f"d_ff={self.d_ff} is not divisible by tensor_parallel={tensor_parallel}")
        need(self.vocab_size % tensor_parallel == 0, "vocab_size",
             f"vocab_size={self.vocab_size} is not divisible by tensor_parallel={tensor_parallel}")
        return self


_TEXT_PRESETS = {
    "umt5-xxl": dict(),  # Wan's text encoder (models_t5_umt5-xxl-enc-bf16.pth)
    "tiny": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, text_len=24),
}


def text_preset(name: str, **overrides) -> TextConfig:
    """`text_preset("umt5-xxl" | "tiny")`."""
    return from_preset(TextConfig, _TEXT_PRESETS, name, "text-encoder", "text", overrides)


def text_config_from(config_json: dict, **overrides) -> TextConfig:
    """TextConfig from a transformers UMT5Config dict (config.json)."""
    known = {f.name for f in dataclasses.fields(TextConfig)}
    values = {k: v for k, v in config_json.items() if k in known and k != "name"}
    values["name"] = "transformers"
    values.update(overrides)
    return build(TextConfig, values, "text").validate()


def transformers_config_json(c: "TextConfig") -> dict:
    """transformers' UMT5Config config.json of `c` (what text_config_from reads back)."""
    return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": c.vocab_size,
            "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_heads": c.num_heads, "num_layers": c.num_layers,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "layer_norm_epsilon": c.layer_norm_epsilon, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
            "is_gated_act": True, "tie_word_embeddings": False, "dropout_rate": 0.0, "pad_token_id": 0,
            "eos_token_id": 1, "decoder_start_token_id": 0, "torch_dtype": "float32"}
