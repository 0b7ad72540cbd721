"""umT5 encoder state-dict names: megawan, the official Wan file (models_t5_umt5-xxl-enc-bf16.pth) and
transformers' UMT5EncoderModel, as one table; plus the tensor-parallel split axes."""

from __future__ import annotations

from megawan.config import TextConfig

TEXT_LAYOUTS = ("megawan", "official", "transformers")

_TOP = [
    ("token_embedding.weight", "token_embedding.weight", "shared.weight"),
    ("norm.weight", "norm.weight", "encoder.final_layer_norm.weight"),
]
_BLOCK = [  # blocks.{i}. / blocks.{i}. / encoder.block.{i}.
    ("norm1.weight", "norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.weight", "ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
]
# transformers ties encoder.embed_tokens to shared
TIED = {"transformers": ("shared.weight", "encoder.embed_tokens.weight")}

TEXT_TP_AXIS = {
    "token_embedding.weight": 0,
    "attn.q.weight": 0, "attn.k.weight": 0, "attn.v.weight": 0, "attn.o.weight": 1,
    "ffn.gate.weight": 0, "ffn.fc1.weight": 0, "ffn.fc2.weight": 1,
    "pos_embedding.embedding.weight": 1,
}


def text_key_table(config: TextConfig) -> list:
    rows = list(_TOP)
    for i in range(config.num_layers):
        rows += [(f"blocks.{i}.{m}", f"blocks.{i}.{o}", f"encoder.block.{i}.{t}") for m, o, t in _BLOCK]
    return rows


def text_param_shapes(config: TextConfig) -> dict:
    d, inner, f = config.d_model, config.num_heads * config.d_kv, config.d_ff
    shapes = {"token_embedding.weight": (config.vocab_size, d), "norm.weight": (d,)}
    per_block = {
        "norm1.weight": (d,), "norm2.weight": (d,),
        "attn.q.weight": (inner, d), "attn.k.weight": (inner, d), "attn.v.weight": (inner, d), "attn.o.weight": (d, inner),
        "pos_embedding.embedding.weight": (config.relative_attention_num_buckets, config.num_heads),
        "ffn.gate.weight": (f, d), "ffn.fc1.weight": (f, d), "ffn.fc2.weight": (d, f),
    }
    for i in range(config.num_layers):
        shapes.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    return shapes
